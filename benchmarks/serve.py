"""Teacher-service benchmark: generated tokens/s of the Serve app at concurrency 1, 8 and 32 against a
sequential loop calling the engine's `generate` one request at a time, in one process, on the same model.

    .venv/bin/python benchmarks/serve.py

The model is a LLaVA a few times larger than the test's MICRO (random weights, ~3M parameters), built
here, so that a batched decoding step costs clearly more than the per-request overhead on 2 cores.
Every request: one image + a question, the paper's sampling (temperature 1, top-p 0.9, top-k 50,
repetition penalty 1.05), `max_tokens` 32, its own seed. The baseline runs in a Ray actor with a
replica's CPUs, so it has the replica's torch threads (printed) and scheduling priority. Also reports
p50/p99 request latency and the time of a mask-level switch (engine direct, and inside the replica).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `serve` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from masters.config import ServeConfig, validate_config  # noqa: E402
from masters.data import text_corpus  # noqa: E402
from masters.models import parameter_count, save_model  # noqa: E402
from masters.tiny_vlms import ModelSize, build_model, build_processor, train_tokenizer  # noqa: E402
from serve.api import ChatMessage  # noqa: E402
from serve.engine import Sampling, TransformersEngine, chat_prompt  # noqa: E402

BENCH_SIZE = ModelSize(text_hidden_size=256, text_layers=4, text_heads=4, text_intermediate_size=688,
                       vision_hidden_size=64, vision_layers=2, vision_heads=2, vision_intermediate_size=128,
                       image_size=32, patch_size=8)  # fmt: skip
MAX_TOKENS = 32
CONCURRENCY = (1, 8, 32)
REQUESTS_PER_CLIENT = 3
SEQUENTIAL_REQUESTS = 12
RATIOS = [0.2, 0.15, 0.1, 0.05, 0.0]


def build_bench_model(out_dir: Path) -> Path:
    tokenizer = train_tokenizer(text_corpus(seed=0, size=500), vocab_size=384)
    model = build_model(BENCH_SIZE, tokenizer, seed=0)
    print(f"model: {parameter_count(model) / 1e6:.1f}M parameters")
    return save_model(model, build_processor(tokenizer, BENCH_SIZE), out_dir)


def image_data_url(index: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (index * 37 % 256, 90, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(index: int) -> dict:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(index)}},
                {"type": "text", "text": f"how many shapes are in picture {index}?"},
            ],
        }
    ]
    return {"model": "teacher@0", "messages": messages, "max_tokens": MAX_TOKENS, "seed": index}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class SequentialBaseline:
    """One process, one request at a time, straight into the engine (no HTTP, no Serve).

    Runs as a Ray actor with a replica's CPUs, so it gets the same torch threads and the same
    scheduling priority as the replicas (Ray starts its workers at niceness 15).
    """

    def __init__(self, model_dir: Path):
        self.engine = TransformersEngine(model_dir, RATIOS)
        self.prompts = []
        for index in range(SEQUENTIAL_REQUESTS):
            messages = [ChatMessage.model_validate(m) for m in request_body(index)["messages"]]
            self.prompts.append(self.engine.encode_chat(chat_prompt(messages, ServeConfig())))
        self.sampling = dict(n=1, max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05)
        self.engine.generate([(self.prompts[0], Sampling(**self.sampling, seed=0))])  # warm-up

    def run(self) -> dict:
        latencies, tokens = [], 0
        started = time.perf_counter()
        for index, prompt in enumerate(self.prompts):
            t0 = time.perf_counter()
            completion = self.engine.generate([(prompt, Sampling(**self.sampling, seed=index))])[0][0]
            latencies.append(time.perf_counter() - t0)
            tokens += len(completion.token_ids)
        elapsed = time.perf_counter() - started
        return {"tokens_per_s": tokens / elapsed, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                "requests": len(latencies)}  # fmt: skip

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def switch_s(self) -> float:
        return statistics.median(self.engine.set_mask_ratio(ratio) for ratio in [0.2, 0.0, 0.1, 0.0, 0.05, 0.0])


async def serve_load(base_url: str, concurrency: int) -> dict:
    latencies: list[float] = []
    tokens = 0

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in range(max(REQUESTS_PER_CLIENT, SEQUENTIAL_REQUESTS // concurrency)):
            t0 = time.perf_counter()
            reply = await http.post(base_url + "/chat/completions", json=request_body(worker * 100 + k))
            reply.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += reply.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
        await http.post(base_url + "/chat/completions", json=request_body(9999))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(worker, http) for worker in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": tokens / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "requests": len(latencies),
    }


def replica_switch_time(base_url: str) -> tuple[float, int]:
    """Alternate levels through the API; the replica records each switch's duration."""
    for model in ["teacher@0.2", "teacher@0", "teacher@0.1", "teacher@0", "teacher@0.05", "teacher@0"]:
        body = request_body(0) | {"model": model, "max_tokens": 1}
        httpx.post(base_url + "/chat/completions", json=body, timeout=120).raise_for_status()
    health = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=60).json()["models"]["teacher"]
    return health["mean_switch_s"], health["torch_threads"]


def main() -> None:
    import ray
    from ray import serve

    from serve.app import start

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bench_model(Path(tmp) / "bench")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = validate_config(
            {
                "models": {"teachers": [{"name": "teacher", "model": str(model_dir)}], "student": str(model_dir)},
                "serve": {"port": port, "max_batch_size": 32, "max_queued_requests": 64},
            }
        )
        print(
            f"serve: max_batch_size={config.serve.max_batch_size}, batch_wait_timeout_s={config.serve.batch_wait_timeout_s}, "
            f"num_cpus per replica={config.serve.num_cpus}"
        )
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            base_url = start(config, {"teacher": model_dir, "student": model_dir})
            switch_in_replica, threads = replica_switch_time(base_url)
            baseline = ray.remote(num_cpus=config.serve.num_cpus)(SequentialBaseline).remote(model_dir)
            print(f"torch threads: replica {threads}, baseline {ray.get(baseline.torch_threads.remote())}")
            # Other processes may share the cores, so each Serve run is paired with a baseline run just before it.
            rows = [(c, ray.get(baseline.run.remote()), asyncio.run(serve_load(base_url, c))) for c in CONCURRENCY]
            switch_in_engine = ray.get(baseline.switch_s.remote())
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"\nmax_tokens={MAX_TOKENS}, one image per request, paper sampling; tokens/s = generated tokens / wall time")
    print(f"{'setup':<30}{'requests':>9}{'tokens/s':>10}{'vs seq':>8}{'p50 s':>8}{'p99 s':>8}")
    for concurrency, sequential, result in rows:
        for name, row in (("sequential engine loop", sequential), (f"Serve, concurrency {concurrency}", result)):
            ratio = row["tokens_per_s"] / sequential["tokens_per_s"]
            print(
                f"{name:<30}{row['requests']:>9}{row['tokens_per_s']:>10.1f}{ratio:>8.2f}{row['p50']:>8.3f}{row['p99']:>8.3f}"
            )
    print(f"\nmask level switch: engine {switch_in_engine * 1e3:.2f} ms (median of 6), "
          f"inside the replica {switch_in_replica * 1e3:.2f} ms (mean of 6)")  # fmt: skip


if __name__ == "__main__":
    main()
