"""Student trainer benchmark: Ray Train (2 CPU workers) vs a plain single-process loop, and memory
per worker against a trainer that also holds the teacher and runs its forward pass.

    .venv/bin/python benchmarks/train.py [--steps 8] [--strategies ddp fsdp2 deepspeed-2 deepspeed-3]

Models are the zoo's default student and large teacher shapes with random weights (speed and memory
do not depend on the weights); records are synthetic (8 responses per question, up to 16 tokens,
teacher top-64). Both sides run the same loss code (`masters.student_loss.student_loss`) on the same
batches: 4 questions per update, one question (8 responses) per forward.

Throughput is response tokens per second over the steps after the first (warm-up), measured inside
the training loop; the Ray figure also lists the whole `fit()` (worker start-up, model loading,
checkpointing). Memory is the peak RSS a fresh process adds (over its RSS after imports) while loading the models and
doing one worker's share of 3 updates: student + reference (ours) vs student + reference + teacher
with its forward (the paper's co-located way).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import harness

harness.run_offline_on_one_thread()
for _name, _value in {"WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from PIL import Image  # noqa: E402

from masters.batching import ShardPlan, StageTable, collate_records  # noqa: E402
from masters.families import VLMFamily  # noqa: E402
from masters.config import MastersConfig  # noqa: E402
from masters.models import load_model, parameter_count, save_model  # noqa: E402
from masters.tiny_vlms import build_model, build_processor, train_tokenizer  # noqa: E402
from masters.records import Response, StageRecord, records_to_table  # noqa: E402
from masters.student_loss import needs_reference, response_logits, student_loss  # noqa: E402

QUESTIONS_PER_BATCH = 4
GROUP_SIZE = 8
MAX_RESPONSE_TOKENS = 16
TOPK = 64


def build_models(directory: Path) -> tuple[Path, Path]:
    """The zoo's student and teacher-l shapes, random weights, sharing one tokenizer."""
    from masters.data import text_corpus
    from masters.zoo import ZooConfig

    zoo = ZooConfig()
    tokenizer = train_tokenizer(text_corpus(seed=0, size=zoo.tokenizer_corpus_size), vocab_size=zoo.vocab_size)
    paths = []
    for role in ("student", "teacher-l"):
        size = zoo.roles[role].size
        paths.append(save_model(build_model(size, tokenizer, seed=0), build_processor(tokenizer, size), directory / role))
    return paths[0], paths[1]


def write_synthetic_stage(processor, stage_dir: Path, num_questions: int, seed: int = 0) -> None:
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    vocab_size = len(processor.tokenizer)
    first_plain_id = len(processor.tokenizer.all_special_ids)
    records = []
    for q in range(num_questions):
        png = io.BytesIO()
        Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3))).save(png, "PNG")
        question = f"How many red shapes are in picture {q}?"
        responses = []
        for j in range(GROUP_SIZE):
            length = rng.randint(MAX_RESPONSE_TOKENS // 2, MAX_RESPONSE_TOKENS)
            logprobs = torch.log_softmax(torch.randn(length, TOPK + 1, generator=generator) * 3, -1)[:, :TOPK]
            responses.append(
                Response(
                    source="teacher" if j < GROUP_SIZE // 2 else "student",
                    text="",
                    token_ids=[rng.randrange(first_plain_id, vocab_size) for _ in range(length)],
                    accuracy_reward=float(rng.random() < 0.5),
                    teacher_topk_ids=[torch.randperm(vocab_size, generator=generator)[:TOPK].tolist() for _ in range(length)],
                    teacher_topk_logprobs=logprobs.tolist(),
                    teacher_tail_mass=(1 - logprobs.exp().sum(-1)).tolist(),
                )
            )
        records.append(
            StageRecord(f"q{q:05d}", "bench", png.getvalue(), question, "3",
                        "teacher-l", 0.1, 1, responses)
        )
    stage_dir.mkdir(parents=True)
    pq.write_table(records_to_table(records), stage_dir / "part-000.parquet")


def config_for(strategy: str) -> MastersConfig:
    name, _, zero = strategy.partition("-")
    return MastersConfig(
        train={
            "strategy": name,
            "zero_stage": int(zero or 3),
            "num_workers": 2,
            "cpus_per_worker": 1,
            "lr": 1e-4,
            "questions_per_batch": QUESTIONS_PER_BATCH,
            "grad_accum_steps": 2,  # 2 workers x 2 micro-batches x 1 question
        },
        logging={"wandb_project": None},
    )


def steady_tokens_per_s(metrics: list[dict]) -> float:
    steady = metrics[1:]  # the first step pays for lazy initialisation
    return sum(m["tokens"] for m in steady) / sum(m["seconds"] for m in steady)


# --------------------------------------------------------------------------- plain single process


def plain_loop(stage_dir: Path, student_dir: Path, steps: int, threads: int = 2) -> list[dict]:
    """The same updates without Ray: one process, `threads` intra-op threads, accumulation over 4 micro-batches."""
    torch.set_num_threads(threads)
    config = config_for("ddp")
    student, processor = load_model(student_dir)
    student.train()
    family = VLMFamily(student, processor)
    reference = load_model(student_dir)[0].requires_grad_(False) if needs_reference(config.loss) else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.train.lr)
    table = StageTable(stage_dir)
    accum = QUESTIONS_PER_BATCH  # one question per forward, as each Ray worker does
    plan = ShardPlan(len(table), QUESTIONS_PER_BATCH, 1, accum, config.train.seed)
    vocab = len(processor.tokenizer)
    history = []
    for step in range(steps):
        started, tokens = time.perf_counter(), 0
        for questions in plan.worker_micro_batches(step, 0):
            batch = collate_records(table.records(questions), family)
            output = student_loss(student, reference, batch, config.loss, config.rewards, vocab)
            (output.loss / accum).backward()
            tokens += batch.num_response_tokens
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"tokens": tokens, "seconds": time.perf_counter() - started})
    return history


# --------------------------------------------------------------------------- memory per worker


def _memory_probe(colocated: bool, stage_dir: str, student_dir: str, teacher_dir: str, steps: int, queue) -> None:
    """One worker's share of training in a fresh process: student + reference, and with `colocated`
    also the teacher and its forward on every micro-batch. Puts (peak MB added by the models and
    training, RSS MB before them) on `queue`."""
    torch.set_num_threads(1)
    config = config_for("ddp")
    table = StageTable(stage_dir)
    plan = ShardPlan(len(table), QUESTIONS_PER_BATCH, 2, 2, 0)
    processor = AutoProcessor.from_pretrained(student_dir)
    with torch.device("meta"):  # the family needs the model's class and config, not its weights
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(student_dir))
    family = VLMFamily(skeleton, processor)
    collate_records(table.records(plan.worker_micro_batches(0, 0)[0]), family)  # warm the data path
    harness.reset_peak()
    floor = harness.status_mb("VmRSS")
    student = load_model(student_dir)[0].train()
    reference = load_model(student_dir)[0].requires_grad_(False)
    teacher = load_model(teacher_dir)[0].requires_grad_(False) if colocated else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.train.lr)
    for step in range(steps):
        for questions in plan.worker_micro_batches(step, 0):
            batch = collate_records(table.records(questions), family)
            if teacher is not None:
                with torch.no_grad():
                    # The co-located trainer scores the responses itself (full logits, top-k taken here).
                    response_logits(teacher, batch).topk(TOPK, dim=-1)
            output = student_loss(student, reference, batch, config.loss, config.rewards, len(processor.tokenizer))
            (output.loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    queue.put((harness.status_mb("VmHWM") - floor, floor))


def peak_added_mb(colocated: bool, stage_dir: Path, student_dir: Path, teacher_dir: Path, steps: int = 3) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_memory_probe, args=(colocated, str(stage_dir), str(student_dir), str(teacher_dir), steps, queue)
    )
    process.start()
    value = queue.get(timeout=600)
    process.join()
    return value


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--strategies", nargs="*", default=["ddp", "fsdp2", "deepspeed-2", "deepspeed-3"])
    args = parser.parse_args()

    import ray

    from cluster.curriculum import StageHandoff
    from cluster.train import TrainingStage, train_curriculum

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        student_dir, teacher_dir = build_models(tmp / "models")
        _, processor = load_model(student_dir)
        stage_dir = tmp / "stage"
        write_synthetic_stage(processor, stage_dir, args.questions)
        print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores)")

        # Tiny models parallelise badly over intra-op threads (and a second thread spins against other
        # load), so both plain variants are measured and the faster one is the baseline.
        rows = [
            (f"plain loop, 1 process x {threads} thread(s)", steady_tokens_per_s(plain_loop(stage_dir, student_dir, args.steps, threads)), None, None)
            for threads in (2, 1)
        ]
        baseline = max(row[1] for row in rows)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for strategy in args.strategies:
                started = time.perf_counter()
                handoff = StageHandoff.remote()
                handoff.ready.remote("bench/0", str(stage_dir))
                (result,) = train_curriculum(config_for(strategy), [TrainingStage("bench/0", args.steps, str(tmp / "out" / strategy))],
                                             handoff, student_dir, student_dir, f"bench-{strategy}", str(tmp / "runs"))
                fit_seconds = time.perf_counter() - started
                rows.append((f"Ray Train {strategy}, 2 workers x 1 thread", steady_tokens_per_s(result.metrics),
                             fit_seconds, result.metrics[-1]["peak_rss_mb"]))
        finally:
            ray.shutdown()

        print(f"\nstudent tokens/s ({args.steps} updates of {QUESTIONS_PER_BATCH} questions x {GROUP_SIZE} responses; "
              "steady state = updates 2..N; ratios against the faster plain loop)")
        print(f"{'trainer':44} {'tokens/s':>9} {'vs plain':>9} {'overhead':>9} {'fit() s':>8} {'worker peak RSS MB':>19}")
        for name, tokens_per_s, fit_seconds, rss in rows:
            ratio = tokens_per_s / baseline
            print(f"{name:44} {tokens_per_s:9.0f} {ratio:9.2f} {1 - ratio:9.0%} "
                  f"{'' if fit_seconds is None else f'{fit_seconds:8.1f}':>8} {'' if rss is None else f'{rss:19.0f}':>19}")

        (ours, floor), (colocated, _) = (peak_added_mb(c, stage_dir, student_dir, teacher_dir) for c in (False, True))
        sizes = {role: parameter_count(load_model(path)[0]) for role, path in (("student", student_dir), ("teacher", teacher_dir))}
        print(f"\npeak memory one worker adds for models + 3 updates, fresh process (student {sizes['student'] / 1e6:.2f}M "
              f"params, teacher {sizes['teacher'] / 1e6:.2f}M; process RSS before the models: {floor:.0f} MB)")
        print(f"{'trainer':52} {'peak MB added':>14} {'ratio':>6}")
        print(f"{'student + reference (ours: teacher top-k stored)':52} {ours:14.1f} {1.0:6.2f}")
        print(f"{'student + reference + teacher forward (co-located)':52} {colocated:14.1f} {colocated / ours:6.2f}")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
