"""Groups per second through one stage: the Ray Data pipeline against a single-process loop.

    .venv/bin/python benchmarks/pipeline.py               # 1,024 questions, the paper's group shape
    .venv/bin/python benchmarks/pipeline.py --questions 64  # a quick look

Both sides do the same work with the micro model (briefly trained on the suite, so its samples are
answers) as teacher and student: `group_teacher` = 4 samples of 16 tokens per question from the
teacher at mask ratio 0.1 and 4 from the unmasked student, the teacher's top-64 log-probs on every
response token (recorded while the teacher samples its own, a score pass for the student's),
rule-based R_acc, and Parquet output. The baseline runs the same
engine code (`serve.engine.TransformersEngine`) in this process, one engine batch after another; the
pipeline runs `cluster.pipeline.run_stage` against the Serve app (two replicas per model) with two
reward actors. The loop is timed with 1 and with 2 torch threads; the faster one is the baseline.

A last row is a design probe, not the pipeline's code path: the same loop body in two Ray Data
actors that each hold the masked teacher (the batch-inference pattern, no Serve hop), to show what
moving the offline pipeline's model work out of Serve would buy on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and benchmarks/serve.py would shadow the
# `serve` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEACHER = "teacher-micro"
MASK_RATIO = 0.1


def build_micro_model(directory: Path, sft_steps: int) -> Path:
    """The micro model, briefly trained on the suite so that its samples are answers: an untrained
    model samples any token, the image placeholder included, which the engine cannot score."""
    from masters.data import make_split, text_corpus
    from masters.families import VLMFamily
    from masters.models import save_model
    from masters.tiny_vlms import MICRO, build_model, build_processor, train_tokenizer
    from masters.sft import encode_examples, train_sft

    tokenizer = train_tokenizer(text_corpus(seed=0, size=500), vocab_size=384)
    processor = build_processor(tokenizer, MICRO)
    model = build_model(MICRO, tokenizer, seed=0)
    train = make_split("train", 2048, seed=1)  # another seed than the benchmark's questions
    examples = encode_examples(processor, [s.image for s in train], [s.question for s in train], [s.answer for s in train])
    train_sft(model, examples, VLMFamily(model, processor), steps=sft_steps, batch_size=32, lr=3e-3,
              warmup_steps=10, progress=False)
    return save_model(model, processor, directory / "micro")


def make_config(work: Path, model_dir: Path, questions: int, port: int):
    from masters.config import validate_config

    return validate_config(
        {
            "name": "bench",
            "storage_path": str(work / "runs"),
            "models": {"teachers": [{"name": TEACHER, "model": str(model_dir)}], "student": str(model_dir)},
            "mask": {"max_mask_ratio": 0.2, "mask_step": 0.1},
            "generation": {"teacher_topk": 64},  # paper's shape: 8 samples, groups of 4 + 4, 16 new tokens
            "rewards": {"actors": 2, "actor_num_cpus": 0.2, "batch_size": 8},
            "serve": {"port": port, "replicas": 2, "num_cpus": 0.3, "max_batch_size": 16},
            "data": {"train_size": questions},
        }
    )


def stage_of(config, questions: int):
    from masters.curriculum import Stage

    return Stage(
        index=0,
        teacher=TEACHER,
        teacher_model=config.models.teachers[0].model,
        teacher_stage=1,
        mask_ratio=MASK_RATIO,
        question_indices=tuple(range(questions)),
        optimizer_steps=1,
    )


def sample(engine, config, prompts, rows, model: str, n: int, score_top_logprobs: int | None = None):
    from cluster.responses import request_seed
    from serve.engine import Sampling

    sampling = config.generation.sampling
    return engine.generate(
        [
            (
                prompt,
                Sampling(
                    n=n,
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    repetition_penalty=sampling.repetition_penalty,
                    seed=request_seed(config.generation.seed, model, row["question_id"]),
                    score_top_logprobs=score_top_logprobs,
                ),
            )
            for prompt, row in zip(prompts, rows)
        ]
    )


def stage_records(engine, student_engine, config, rows: list[dict], times: dict[str, float]):
    """The stage's records (an Arrow table) for `rows` (question fields and `image_png`) with in-process
    engines (the masked teacher and the student), one engine batch after another; adds seconds per step
    to `times`."""
    import pyarrow as pa

    from cluster.responses import image_messages
    from masters.records import STAGE_SCHEMA, responses_array
    from masters.judging import rule_accuracy
    from serve.api import ChatMessage
    from serve.engine import chat_prompt
    from masters.curriculum import STUDENT, model_id

    generation = config.generation
    model = model_id(TEACHER, MASK_RATIO)
    batch_size = config.serve.max_batch_size
    records, record_groups = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        clock = time.perf_counter()
        prompts = [
            engine.encode_chat(
                chat_prompt([ChatMessage.model_validate(m) for m in image_messages(row["image_png"], row["question"])], config.serve)
            )
            for row in chunk
        ]
        times["encode"] += time.perf_counter() - clock
        clock = time.perf_counter()
        # The teacher's scores of its own samples are recorded while sampling, as the service does.
        teacher = sample(engine, config, prompts, chunk, model, generation.group_teacher, generation.teacher_topk)
        student = sample(student_engine, config, prompts, chunk, STUDENT, generation.group_student)
        times["generate"] += time.perf_counter() - clock
        groups = [
            [{"source": "teacher", "text": c.text, "token_ids": c.token_ids, "scores": c.scores} for c in by_teacher]
            + [{"source": "student", "text": c.text, "token_ids": c.token_ids, "scores": None} for c in by_student]
            for by_teacher, by_student in zip(teacher, student)
        ]
        clock = time.perf_counter()
        # The student's responses are scored; one engine batch holds at most max_batch_size items, as a replica's does.
        unscored = [r for group in groups for r in group if r["scores"] is None]
        items = [(prompt, r["token_ids"], generation.teacher_topk) for prompt, group in zip(prompts, groups) for r in group if r["scores"] is None]
        for offset in range(0, len(items), batch_size):
            for response, score in zip(unscored[offset : offset + batch_size], engine.score(items[offset : offset + batch_size])):
                response["scores"] = score
        times["score"] += time.perf_counter() - clock
        clock = time.perf_counter()
        for row, group in zip(chunk, groups):
            responses = []
            for response in group:
                score = response.pop("scores")
                responses.append(
                    {
                        **response,
                        "accuracy_reward": rule_accuracy(response["text"], row["answer"], config.rewards.judge.numeric_tolerance),
                        "teacher_topk_ids": score.top_ids,
                        "teacher_topk_logprobs": score.top_logprobs,
                        "teacher_tail_mass": score.tail_mass,
                    }
                )
            records.append(
                {
                    **{name: row[name] for name in ("question_id", "family", "image_png", "question", "answer")},
                    "teacher": TEACHER,
                    "mask_ratio": MASK_RATIO,
                    "stage_index": 1,
                }
            )
            record_groups.append(responses)
        times["rewards"] += time.perf_counter() - clock
    # Built like the reward actors build theirs: question fields as rows, responses from arrays.
    clock = time.perf_counter()
    fields = pa.schema([STAGE_SCHEMA.field(name) for name in STAGE_SCHEMA.names[:-1]])
    table = pa.Table.from_pylist(records, schema=fields).append_column(STAGE_SCHEMA.field("responses"), responses_array(record_groups))
    times["rewards"] += time.perf_counter() - clock
    return table.cast(STAGE_SCHEMA)


def question_rows(samples) -> list[dict]:
    from masters.data.export import png_bytes

    return [
        {
            "question_id": sample.id,
            "family": sample.family,
            "image_png": png_bytes(sample.image),
            "question": sample.question,
            "answer": sample.answer,
        }
        for sample in samples
    ]


def engines(config, model_dir: Path):
    """The masked teacher and the student (the same micro model, unmasked)."""
    from serve.engine import TransformersEngine

    teacher = TransformersEngine(model_dir, config.mask.ratios, config.mask.scope)
    teacher.set_mask_ratio(MASK_RATIO)
    return teacher, TransformersEngine(model_dir, [0.0], config.mask.scope)


def single_process_stage(config, model_dir: Path, samples, out: Path, threads: int, positions: dict) -> dict[str, float]:
    """The same stage as one loop in this process with `threads` torch threads; returns seconds per step
    and puts the token positions each engine computed into `positions` (by model)."""
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(threads)
    times = dict.fromkeys(["load", "encode", "generate", "score", "rewards", "write"], 0.0)
    clock = time.perf_counter()
    engine, student_engine = engines(config, model_dir)
    times["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rows = question_rows(samples)
    times["encode"] += time.perf_counter() - clock
    records = stage_records(engine, student_engine, config, rows, times)
    clock = time.perf_counter()
    pq.write_table(records, out)
    times["write"] = time.perf_counter() - clock
    positions.update({TEACHER: dict(engine.positions), "student": dict(student_engine.positions)})
    return times


POSITION_KINDS = ("prefill", "decode", "score")


def replica_positions(model: str, replicas: int) -> dict[str, int]:
    """Token positions computed so far by all `replicas` of `model`, from each replica's health report."""
    from ray import serve

    from serve.levels import APP_NAME

    handle = serve.get_deployment_handle(model, app_name=APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(100):  # each call reaches one replica
        state = handle.health.remote().result()
        seen[state["replica"]] = state
        if len(seen) == replicas:
            break
    return {kind: sum(state[f"{kind}_positions"] for state in seen.values()) for kind in POSITION_KINDS}


class EngineWorker:
    """Design probe, not the pipeline's code path: a Ray Data actor that holds the masked teacher
    and does the stage's work in-process (the batch-inference pattern), with no Serve hop."""

    def __init__(self, model_dir: str, config):
        import torch

        torch.set_num_threads(1)
        self.config = config
        self.engine, self.student_engine = engines(config, Path(model_dir))

    def __call__(self, batch):
        return stage_records(self.engine, self.student_engine, self.config, batch.to_pylist(), defaultdict(float))


def engine_actor_stage(config, model_dir: Path, samples, out: Path) -> tuple[float, float]:
    """The stage through two `EngineWorker` actors (1 CPU each) on the running Ray cluster; returns
    the seconds it took and the seconds until its first groups arrived (mostly the actors' start)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data import ActorPoolStrategy

    from masters.records import STAGE_SCHEMA

    clock = time.perf_counter()
    rows = question_rows(samples)
    size = config.serve.max_batch_size
    dataset = ray.data.from_blocks([pa.Table.from_pylist(rows[i : i + size]) for i in range(0, len(rows), size)])
    dataset = dataset.map_batches(
        EngineWorker,
        batch_format="pyarrow",
        batch_size=size,
        compute=ActorPoolStrategy(size=2),
        num_cpus=1,
        fn_constructor_kwargs={"model_dir": str(model_dir), "config": config},
    )
    tables, first_s = [], None
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        first_s = first_s or time.perf_counter() - clock
        tables.append(table)
    pq.write_table(pa.concat_tables(tables).cast(STAGE_SCHEMA), out)
    return time.perf_counter() - clock, first_s


class CpuByRole:
    """CPU seconds per kind of process while the pipeline runs, from a poll of every process.

    Ray workers change their title between tasks (`ray::IDLE`), so a process keeps the first task
    role it was seen in; a process that exits between two polls loses its CPU since the last one.
    """

    SYSTEM = "Ray and Serve system processes"

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self.names: dict[int, str] = {}  # what each process is, for the system processes' breakdown
        self.marked: dict[int, float] = {}  # CPU seconds at `mark()`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_until_stopped, daemon=True)

    @staticmethod
    def role(pid: int, title: str) -> str | None:
        if pid == os.getpid():
            return "driver (this process)"
        for needle, role in (
            (f"ServeReplica:masters:{TEACHER}", "teacher replicas"),
            ("ServeReplica:masters:student", "student replicas"),
            ("sample_responses", "sampling tasks"),
            ("RewardScorer", "reward actors"),
            ("EngineWorker", "engine actors (probe)"),
        ):
            if needle in title:
                return role
        return None if "IDLE" in title else CpuByRole.SYSTEM

    @staticmethod
    def short_name(title: str) -> str:
        words = title.split()
        if not words:
            return "?"
        if words[0].startswith("ray::"):
            return words[0].split(".")[0]
        if "-m" in words[:-1]:
            return words[words.index("-m") + 1]
        return Path(words[1] if Path(words[0]).name.startswith("python") and len(words) > 1 else words[0]).name

    def _poll(self) -> None:
        import psutil

        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                title = " ".join(process.info["cmdline"] or [])
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pid, seconds = process.info["pid"], times.user + times.system
            self.first.setdefault(pid, seconds)
            self.last[pid] = seconds
            self.names.setdefault(pid, self.short_name(title))
            role = self.role(pid, title)
            if role is not None and self.roles.get(pid, self.SYSTEM) == self.SYSTEM:
                self.roles[pid] = role

    def _poll_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> "CpuByRole":
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def mark(self) -> None:
        """Remember every process's CPU seconds now: `seconds(since_mark=True)` counts from here."""
        self._poll()
        self.marked = dict(self.last)

    def seconds(self, since_mark: bool = False) -> dict[str, float]:
        by_role: dict[str, float] = defaultdict(float)
        for pid, seconds in self.last.items():
            start = self.marked.get(pid, self.first[pid]) if since_mark else self.first[pid]
            by_role[self.roles.get(pid, self.SYSTEM)] += seconds - start
        return dict(sorted(by_role.items(), key=lambda item: -item[1]))

    def processes(self) -> dict[str, int]:
        """How many processes used CPU in each role."""
        counts: dict[str, int] = defaultdict(int)
        for pid, seconds in self.last.items():
            if seconds > self.first[pid]:
                counts[self.roles.get(pid, self.SYSTEM)] += 1
        return counts

    def system_seconds(self, at_least: float = 0.1) -> dict[str, float]:
        """The system processes' CPU seconds by what they are, the ones above `at_least`."""
        by_name: dict[str, float] = defaultdict(float)
        for pid, seconds in self.last.items():
            if self.roles.get(pid, self.SYSTEM) == self.SYSTEM:
                by_name[self.names[pid]] += seconds - self.first[pid]
        return {name: s for name, s in sorted(by_name.items(), key=lambda item: -item[1]) if s >= at_least}


def operator_times(stats: str) -> list[str]:
    """The per-operator wall-time lines of a Ray Data stats summary."""
    lines, operator = [], None
    for line in stats.splitlines():
        if line.startswith("Operator"):
            operator = line.split(":")[0].removeprefix("Operator ").strip()
        elif operator and "Remote wall time" in line:
            lines.append(f"{operator}: {line.strip()}")
            operator = None
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1024)
    parser.add_argument("--sft-steps", type=int, default=200, help="training steps of the micro model (not timed)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.pipeline import run_stages
    from cluster.responses import ServiceAddress
    from masters.data import make_split
    from masters.data.source import QuestionIndex
    from serve.app import start

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model_dir = build_micro_model(work, args.sft_steps)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(work, model_dir, args.questions, port)
    samples = make_split("train", args.questions, config.data.seed)
    questions = QuestionIndex.open(config.data, "train", args.questions, config.storage_path)
    run_dir = work / "runs" / "bench"

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        clock = time.perf_counter()
        start(config, {TEACHER: model_dir, "student": model_dir})
        deploy_s = time.perf_counter() - clock
        models = (TEACHER, "student")
        before = {model: replica_positions(model, config.serve.replicas) for model in models}
        arrived = {"groups": 0}

        def on_groups(stage, count: int) -> None:
            # Steady state starts when the first groups arrive: the workers and actors are up.
            if not arrived["groups"]:
                arrived["first_s"] = time.perf_counter() - clock
                arrived["first_groups"] = count
                cpu.mark()
            arrived["groups"] += count

        with CpuByRole() as cpu:
            clock = time.perf_counter()
            (result,) = run_stages(
                config, [stage_of(config, args.questions)], questions, run_dir, ServiceAddress(), model_dir, on_groups=on_groups
            )
            pipeline_s = time.perf_counter() - clock
        after = {model: replica_positions(model, config.serve.replicas) for model in models}
        pipeline_positions = {model: {k: after[model][k] - before[model][k] for k in POSITION_KINDS} for model in models}
        assert not result.skipped and result.manifest["counts"]["records"] == args.questions
        serve.shutdown()  # the design probe below needs no service, and idle replicas still poll
        with CpuByRole() as probe_cpu:
            actors_s, first_s = engine_actor_stage(config, model_dir, samples, work / "engine_actors.parquet")
    finally:
        serve.shutdown()
        ray.shutdown()

    # The baselines run after Ray is gone, so they have both cores to themselves. Torch's intra-op
    # threads help little with a model this small and hurt when other processes share the cores, so
    # the loop is timed with 1 and with 2 threads and the faster one is the baseline.
    loop_positions: dict = {}
    loops = {
        threads: single_process_stage(config, model_dir, samples, work / "baseline.parquet", threads, loop_positions)
        for threads in (1, 2)
    }
    best = min(loops, key=lambda threads: sum(loops[threads].values()))
    baseline_s = sum(loops[best].values())

    groups = args.questions
    print(f"\nstage of {groups} questions, groups of {config.generation.group_size} "
          f"({config.generation.group_teacher} teacher samples each), top-k {config.generation.teacher_topk}, "
          f"{platform.node()} with {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"(not timed: Serve deploy {deploy_s:.1f}s)\n")
    print(f"{'path':34s} {'seconds':>9s} {'groups/s':>9s} {'ratio':>7s}")
    for threads, steps in loops.items():
        seconds = sum(steps.values())
        name = f"single-process loop, {threads} thread{'s' if threads > 1 else ''}"
        print(f"{name:34s} {seconds:9.1f} {groups / seconds:9.2f} {baseline_s / seconds:7.2f}")
    print(f"{'Ray Data pipeline (run_stages)':34s} {pipeline_s:9.1f} {groups / pipeline_s:9.2f} {baseline_s / pipeline_s:7.2f}")
    steady_s, steady_groups = pipeline_s - arrived["first_s"], groups - arrived["first_groups"]
    steady_rate = steady_groups / steady_s
    print(f"{'  after its first groups':34s} {steady_s:9.1f} {steady_rate:9.2f} {steady_rate * baseline_s / groups:7.2f}"
          f"  ({steady_groups} groups; the first {arrived['first_groups']} after {arrived['first_s']:.1f}s)")
    print(f"{'probe: engine in 2 Ray Data actors':34s} {actors_s:9.1f} {groups / actors_s:9.2f} {baseline_s / actors_s:7.2f}")
    print(f"\nsingle-process loop ({best} thread(s)), seconds per step:")
    for name, seconds in loops[best].items():
        print(f"  {name:10s} {seconds:8.1f}  ({100 * seconds / baseline_s:4.1f}%)")
    print(f"\npipeline, CPU seconds by process while it ran ({os.cpu_count()} cores x {pipeline_s:.1f}s "
          f"= {os.cpu_count() * pipeline_s:.1f} CPU-s available):")
    processes = cpu.processes()
    for role, seconds in cpu.seconds().items():
        print(f"  {role:32s} {seconds:6.1f}  ({processes[role]} processes)")
    for name, seconds in cpu.system_seconds().items():
        print(f"    {name:30s} {seconds:6.1f}")
    print(f"\nprobe, CPU seconds by process ({os.cpu_count() * actors_s:.1f} CPU-s available; "
          f"first groups after {first_s:.1f}s):")
    for role, seconds in probe_cpu.seconds().items():
        print(f"  {role:32s} {seconds:6.1f}")
    print("\npipeline, CPU outside the model replicas per group:")
    for label, by_role, count in (("whole stage", cpu.seconds(), groups),
                                  ("after its first groups", cpu.seconds(since_mark=True), steady_groups)):
        outside = {role: seconds for role, seconds in by_role.items() if "replicas" not in role}
        parts = ", ".join(f"{role} {1000 * seconds / count:.1f}" for role, seconds in outside.items())
        print(f"  {label:24s} {1000 * sum(outside.values()) / count:5.1f} ms  ({parts})")
    print("\nmodel token positions computed per group (counted by the engines; padding excluded):")
    print(f"  {'path':10s} {'model':14s} " + " ".join(f"{kind:>8s}" for kind in POSITION_KINDS) + f" {'total':>8s}")
    for path, positions in (("loop", loop_positions), ("pipeline", pipeline_positions)):
        for model in (TEACHER, "student"):
            counts = [positions[model][kind] / groups for kind in POSITION_KINDS]
            print(f"  {path:10s} {model:14s} " + " ".join(f"{c:8.1f}" for c in counts) + f" {sum(counts):8.1f}")
    print("\npipeline, Ray Data operators (remote wall time summed over tasks, overlapping):")
    for line in operator_times(result.execution_stats):
        print(f"  {line}")


if __name__ == "__main__":
    main()
