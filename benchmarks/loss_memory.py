"""Peak memory of the student's loss (forward + backward) against response tokens: full logits vs chunked.

    .venv/bin/python benchmarks/loss_memory.py [--tokens 256 1024 4096] [--chunks 256 1024] [--vocab 32000]

Model: the micro LLaVA of the tests (`masters.tiny_vlms.MICRO`: Llama 64 wide x 2 layers, CLIP 32 x 2,
random weights) with its vocabulary padded to `--vocab` (32k: a tokenizer's worth of LM head, 2.05M of
its 2.16M parameters). One question with 8 responses of equal length per batch (`--tokens` response
tokens in all), teacher top-64 per token, the default objective (`full`: JSD + GRPO with the k3 KL to a
frozen reference, which is a copy of the student). Both sides run `masters.student_loss.student_loss`:
`loss.chunk_tokens: null` (the reference's and the student's [8, T, V] logits, then `masters_loss`) and
`loss.chunk_tokens: C` (hidden states, then LM head + log-softmax + per-token terms C tokens at a time).

Each cell runs in a fresh process: build the models and the batch, run the same loss once on a
16-token batch (lazy initialisation), drop the gradients, reset the peak (VmHWM, /proc/self/clear_refs),
then one forward + backward of the loss on the measured batch. The figure is the peak RSS over the RSS
just before that step; it includes the model's own activations, so the last column measures those
alone (the same forward through the student and reference bodies, backward from the hidden states,
no LM head and no loss).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import time

import harness

harness.run_offline_on_one_thread()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from masters.batching import ResponseBatch, collate_records  # noqa: E402
from masters.config import LossConfig, RewardConfig  # noqa: E402
from masters.families import VLMFamily  # noqa: E402
from masters.tiny_vlms import MICRO, build_model, build_processor, train_tokenizer  # noqa: E402
from masters.records import Response, StageRecord  # noqa: E402
from masters.student_loss import needs_reference, response_hidden_states, student_loss  # noqa: E402

RESPONSES = 8
TOPK = 64
WARMUP_TOKENS = 16
MODEL_ONLY = "model only"
# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
# chunk-sized buffers come from the heap, which small long-lived allocations in between (graph nodes,
# per-chunk outputs) keep from shrinking: RSS then grows with the number of chunks although the live
# tensors do not. A fixed threshold keeps every buffer over 1 MiB mmapped and returned on free, so RSS
# follows the live tensors; both settings are measured.
MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
ALLOCATORS = {"live tensors": 1 << 20, "glibc default": None}
TIMED = "glibc default"  # mmapping every buffer costs page faults, so times come from the default setting


def synthetic_batch(processor, family: VLMFamily, tokens: int, vocab: int, seed: int = 0) -> ResponseBatch:
    """One question, RESPONSES responses of tokens // RESPONSES ids each from the padded vocabulary."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    length = tokens // RESPONSES
    first_plain_id = len(processor.tokenizer.all_special_ids)
    png = io.BytesIO()
    Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3))).save(png, "PNG")
    responses = []
    for j in range(RESPONSES):
        logprobs = torch.log_softmax(torch.randn(length, TOPK + 1, generator=generator) * 3, -1)[:, :TOPK]
        topk_ids = torch.stack([torch.randperm(vocab, generator=generator)[:TOPK] for _ in range(length)])
        responses.append(
            Response(
                source="student",
                text="",
                token_ids=[rng.randrange(first_plain_id, vocab) for _ in range(length)],
                accuracy_reward=float(j % 2),
                teacher_topk_ids=topk_ids.tolist(),
                teacher_topk_logprobs=logprobs.tolist(),
                teacher_tail_mass=(1 - logprobs.exp().sum(-1)).tolist(),
            )
        )
    question = "How many red shapes are in the picture?"
    record = StageRecord("q0", "bench", png.getvalue(), question, "3", "teacher-l",
                         0.1, 1, responses)  # fmt: skip
    return collate_records([record], family)


def _probe(tokens: int, chunk_tokens: int | None | str, vocab: int, queue) -> None:
    """One cell in a fresh process; puts (peak MB added by one loss step, seconds, RSS MB before it)."""
    torch.set_num_threads(1)
    from masters.data import text_corpus

    tokenizer = train_tokenizer(text_corpus(seed=0, size=500), vocab_size=384)
    size = MICRO.model_copy(update={"max_positions": 2 * tokens // RESPONSES + 256})
    student = build_model(size, tokenizer, seed=0)
    student.resize_token_embeddings(vocab, mean_resizing=False)  # a 32k-token LM head over the micro body
    student.train()
    processor = build_processor(tokenizer, size)
    family = VLMFamily(student, processor)
    config, rewards = LossConfig(), RewardConfig()
    reference = None
    if needs_reference(config):
        reference = build_model(size, tokenizer, seed=0)
        reference.resize_token_embeddings(vocab, mean_resizing=False)
        reference.load_state_dict(student.state_dict())
        reference.requires_grad_(False)

    def step(batch: ResponseBatch) -> None:
        if chunk_tokens == MODEL_ONLY:
            if reference is not None:
                with torch.no_grad():
                    response_hidden_states(reference, batch)
            hidden, _ = response_hidden_states(student, batch)
            hidden.sum().backward()
        else:
            chunked = config.model_copy(update={"chunk_tokens": chunk_tokens})
            student_loss(student, reference, batch, chunked, rewards, vocab).loss.backward()

    step(synthetic_batch(processor, family, WARMUP_TOKENS, vocab, seed=1))
    student.zero_grad(set_to_none=True)
    batch = synthetic_batch(processor, family, tokens, vocab)
    harness.reset_peak()
    floor = harness.status_mb("VmRSS")
    started = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - started
    queue.put((harness.status_mb("VmHWM") - floor, seconds, floor))


def measure(
    tokens: int, chunk_tokens: int | None | str, vocab: int, mmap_threshold: int | None
) -> tuple[float, float, float]:
    """One cell in a fresh process; `mmap_threshold` set = glibc's MALLOC_MMAP_THRESHOLD_ in that process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_probe, args=(tokens, chunk_tokens, vocab, queue))
    saved = os.environ.pop(MMAP_THRESHOLD_VARIABLE, None)
    if mmap_threshold is not None:
        os.environ[MMAP_THRESHOLD_VARIABLE] = str(mmap_threshold)
    try:
        process.start()  # the child reads the allocator setting from its environment at start-up
    finally:
        os.environ.pop(MMAP_THRESHOLD_VARIABLE, None)
        if saved is not None:
            os.environ[MMAP_THRESHOLD_VARIABLE] = saved
    try:
        return queue.get(timeout=1800)
    finally:
        process.join()


def _label(chunk: int | None | str) -> str:
    return "unchunked" if chunk is None else chunk if chunk == MODEL_ONLY else f"chunk {chunk}"


def _memory_table(results: dict, tokens_list: list[int], chunks: list[int], vocab: int) -> None:
    columns = [*chunks, MODEL_ONLY]
    print(f"{'tokens':>6} {'[N, V] f32 MB':>13} {'unchunked':>10}" + "".join(f" {_label(c):>17}" for c in columns))
    for tokens in tokens_list:
        base = results[tokens, None][0]
        row = f"{tokens:6d} {tokens * vocab * 4 / 2**20:13.0f} {base:10.0f}"
        for chunk in columns:
            peak = results[tokens, chunk][0]
            row += f" {peak:8.0f} ({peak / base:5.2f}x)"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="response tokens per batch")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="chunk_tokens values")
    parser.add_argument("--vocab", type=int, default=32_000)
    args = parser.parse_args()
    if any(t % RESPONSES or t < RESPONSES for t in args.tokens):
        parser.error(f"--tokens must be multiples of {RESPONSES} (the responses of the question)")

    print(f"load average at start: {os.getloadavg()[0]:.1f}; torch {torch.__version__}, 1 thread per cell; "
          f"vocabulary {args.vocab}, {RESPONSES} responses, teacher top-{TOPK}, objective full (student + reference)")
    columns: list[int | None | str] = [None, *args.chunks, MODEL_ONLY]
    results: dict[str, dict] = {}
    for allocator, threshold in ALLOCATORS.items():
        results[allocator] = {}
        for tokens in args.tokens:
            for chunk in columns:
                peak, seconds, floor = results[allocator][tokens, chunk] = measure(tokens, chunk, args.vocab, threshold)
                print(f"  {allocator:>13}, {tokens:6d} tokens, {_label(chunk):>10}: peak +{peak:8.1f} MB, "
                      f"{seconds:6.2f} s (RSS before {floor:.0f} MB)", flush=True)

    print("\npeak RSS added by one loss forward + backward (MB), and its ratio to the unchunked loss at the same "
          "tokens; [N, V] f32 = one float32 copy of the batch's logits")
    for allocator, threshold in ALLOCATORS.items():
        setting = "glibc defaults" if threshold is None else f"{MMAP_THRESHOLD_VARIABLE}={threshold}"
        print(f"\n{allocator} ({setting})")
        _memory_table(results[allocator], args.tokens, args.chunks, args.vocab)
    timed = results[TIMED]
    print(f"\nseconds of that step ({TIMED}; 1 thread; chunked recomputes each chunk's logits in backward)")
    print(f"{'tokens':>6} {'unchunked':>10}" + "".join(f" {_label(c):>17}" for c in args.chunks))
    for tokens in args.tokens:
        base = timed[tokens, None][1]
        print(f"{tokens:6d} {base:10.2f}" + "".join(
            f" {timed[tokens, c][1]:8.2f} ({timed[tokens, c][1] / base:5.2f}x)" for c in args.chunks))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
