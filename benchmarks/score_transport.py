"""What one group's teacher scores cost between the engine and the stage record, lists against arrays.

    .venv/bin/python benchmarks/score_transport.py

A group is 8 responses with the teacher's top-64 on every token. The baseline is the earlier path:
the engine's tensors as Python lists in pydantic `ScoreData`, pickled across the handle as a
`ScoreResponse`, then dicts into `pa.array`. Ours: `serve.api.TokenScores` (numpy) pickled, then
`masters.records.responses_array`. Both end in the same Arrow column (checked). Milliseconds per group
from the engine's output to the column (the top-k itself is the same on both paths and not timed),
median of repeats, this process only (no Ray): the shape of the pipeline benchmark (16 tokens) and a
longer answer (512 tokens).
"""

from __future__ import annotations

import argparse
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and benchmarks/serve.py would shadow the
# `serve` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from masters.records import RESPONSE_TYPE, responses_array  # noqa: E402
from serve.api import ScoreData, ScoreResponse, TokenScores, Usage  # noqa: E402
from serve.engine import top_k_scores  # noqa: E402

RESPONSES, TOP_K, VOCAB = 8, 64, 4_096  # the conversion cost does not depend on the vocabulary


def engine_scores(tokens: int) -> list[TokenScores]:
    """What the engine returns for one group (the top-k itself is the same on both paths, not timed)."""
    generator = torch.Generator().manual_seed(0)
    return [
        top_k_scores(
            torch.randn(tokens, VOCAB, generator=generator).log_softmax(-1),
            torch.randint(0, VOCAB, (tokens,), generator=generator),
            TOP_K,
        )
        for _ in range(RESPONSES)
    ]


def as_lists(scores: list[TokenScores]) -> pa.Array:
    # Replica: lists in pydantic (what the engine and `score` built before).
    data = [
        ScoreData(
            index=i, token_ids=s.token_ids.tolist(), logprobs=s.logprobs.tolist(), top_ids=s.top_ids.tolist(),
            top_logprobs=s.top_logprobs.tolist(), tail_mass=s.tail_mass.tolist(),
        )
        for i, s in enumerate(scores)
    ]
    reply = ScoreResponse(model="t@0.1", top_logprobs=TOP_K, data=data, usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0))
    reply = pickle.loads(pickle.dumps(reply, protocol=5))  # across the handle
    # Reward actor: dicts, then Arrow.
    group = [
        {"source": "teacher", "text": "", "token_ids": d.token_ids, "accuracy_reward": 1.0, "teacher_topk_ids": d.top_ids,
         "teacher_topk_logprobs": d.top_logprobs, "teacher_tail_mass": d.tail_mass}
        for d in sorted(reply.data, key=lambda d: d.index)
    ]
    return pa.array([group], type=pa.list_(RESPONSE_TYPE))


def as_arrays(scores: list[TokenScores]) -> pa.Array:
    scores = pickle.loads(pickle.dumps(scores, protocol=5))
    group = [
        {"source": "teacher", "text": "", "token_ids": s.token_ids, "accuracy_reward": 1.0, "teacher_topk_ids": s.top_ids,
         "teacher_topk_logprobs": s.top_logprobs, "teacher_tail_mass": s.tail_mass}
        for s in scores
    ]
    return responses_array([group])


def median_ms(run, scores, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(scores)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"one group: {RESPONSES} responses, top-{TOP_K}; engine output to Arrow column, ms per group ({platform.node()})")
    print(f"{'tokens':>6}  {'lists (baseline)':>16}  {'arrays':>8}  {'speed-up':>8}")
    for tokens in (16, 512):
        scores = engine_scores(tokens)
        assert as_lists(scores).equals(as_arrays(scores))
        lists_ms = median_ms(as_lists, scores, args.repeats)
        arrays_ms = median_ms(as_arrays, scores, args.repeats)
        print(f"{tokens:>6}  {lists_ms:>16.2f}  {arrays_ms:>8.2f}  {lists_ms / arrays_ms:>7.1f}x")


if __name__ == "__main__":
    main()
