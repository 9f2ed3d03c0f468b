"""Memory and time per question as the train split grows: does anything hold the dataset in one place?

    .venv/bin/python benchmarks/scale.py                          # 1k, 10k and 100k questions
    .venv/bin/python benchmarks/scale.py --sizes 1000 10000       # a quicker look

Each size runs in a fresh process, which is the driver: it indexes the generated suite's train split
(written to Parquet first, 64 px images), starts the teacher service, produces one stage's records
with `cluster.pipeline.run_stages` (1 sample from the teacher, 1 from the student, 4 new tokens, the
teacher's top-8, rule R_acc) and trains the student on them with `cluster.train.train_curriculum`
(one Ray Train worker, one pass, 64 questions per update). The models are the micro zoo's
(`configs/zoo/micro.yaml`, built once and cached). Reported per size:

- the driver's peak RSS (this process: index, plan, pipeline, trainer launch) and one trainer
  worker's (`peak_rss_mb` of its last step), and their ratio to the smallest size's;
- seconds per question of generation (first to last group arriving at the driver, so the service's
  and the actors' start-up is not counted) and of training (the sum of the steps' own seconds), and
  their ratio to the smallest size's.

The loss's memory against tokens and chunk size is `benchmarks/loss_memory.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and benchmarks/serve.py would shadow the
# `serve` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _name, _value in {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_name, _value)

QUESTIONS_PER_UPDATE = 64


def config_for(size: int, work: Path):
    from masters.config import load_config

    overrides = {
        "name": f"scale-{size}",
        "storage_path": str(work / "runs"),
        "models.teachers": [{"name": "teacher-l", "model": "zoo:teacher-l"}],
        "models.zoo_dir": str(ROOT / ".cache" / "zoo"),
        "models.zoo_config": str(ROOT / "configs" / "zoo" / "micro.yaml"),
        "mask.max_mask_ratio": 0.0,  # one stage, the full teacher
        "generation.group_teacher": 1,
        "generation.group_student": 1,
        "generation.teacher_topk": 8,
        "generation.sampling.max_new_tokens": 4,
        "rewards.actors": 1,
        "rewards.batch_size": 64,
        "serve.replicas": 1,
        "serve.max_batch_size": 64,
        "train.questions_per_batch": QUESTIONS_PER_UPDATE,
        "train.epochs": 1,
        "train.checkpoint_every_steps": 0,
        "data.train_size": size,
        "logging.log_every_steps": 1_000_000,
    }
    return load_config(ROOT / "configs" / "micro.yaml", [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def measure(size: int, work: Path) -> dict:
    """One size, end to end in this process; returns the figures."""
    import ray
    from ray import serve

    from cluster.curriculum import StageHandoff
    from cluster.pipeline import run_stages
    from cluster.responses import ServiceAddress
    from cluster.train import TrainingStage, train_curriculum
    from masters.curriculum import STUDENT, plan_curriculum
    from masters.data.source import QuestionIndex
    from masters.run_layout import RunLayout
    from masters.zoo import resolve_model_paths
    from serve.app import start

    config = config_for(size, work)
    model_paths = resolve_model_paths(config, build_missing=True)
    clock = time.perf_counter()
    questions = QuestionIndex.open(config.data, "train", size, config.storage_path)
    index_s = time.perf_counter() - clock
    (stage,) = plan_curriculum(config, size)
    layout = RunLayout.of(config)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        start(config, model_paths)
        arrivals: list[tuple[float, int]] = []
        (records,) = run_stages(
            config, [stage], questions, layout.records_root, ServiceAddress(), model_paths[STUDENT],
            on_groups=lambda _, count: arrivals.append((time.perf_counter(), count)),
        )  # fmt: skip
        serve.shutdown()  # the trainer gets the CPUs the replicas held
        handoff = StageHandoff.remote()
        ray.get(handoff.ready.remote(stage.stage_id, str(records.directory.resolve())))
        (trained,) = train_curriculum(
            config,
            [TrainingStage(stage.stage_id, stage.optimizer_steps, str(layout.stage_output(stage.stage_id)))],
            handoff,
            student_in=model_paths[STUDENT],
            reference=model_paths[STUDENT],
            run_name=layout.train_run_name,
            storage_path=str(layout.train_storage),
        )
    finally:
        ray.shutdown()
    (first_at, first_count), (last_at, _) = arrivals[0], arrivals[-1]
    return {
        "size": size,
        "index_s": index_s,
        "generate_s_per_question": (last_at - first_at) / (size - first_count),
        "train_s_per_question": sum(step["seconds"] for step in trained.metrics) / size,
        "steps": len(trained.metrics),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": trained.metrics[-1]["peak_rss_mb"],
        "records_mb": sum(p.stat().st_size for p in records.directory.glob("*.parquet")) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="train questions per run")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args.one, args.work)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    for size in args.sizes:
        clock = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--work", str(work)], capture_output=True, text=True, cwd=ROOT
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"size {size} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        rows.append({**json.loads(lines[-1].removeprefix("RESULT ")), "wall_s": time.perf_counter() - clock})
        print(f"  {size:>7} questions done in {rows[-1]['wall_s']:.0f} s", flush=True)

    base = rows[0]
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one stage, micro zoo; "
          f"ratios against {base['size']} questions\n")
    header = (f"{'questions':>9} {'driver RSS MB':>14} {'ratio':>6} {'worker RSS MB':>14} {'ratio':>6} "
              f"{'gen ms/q':>9} {'ratio':>6} {'train ms/q':>11} {'ratio':>6} {'records MB':>11} {'index s':>8} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['size']:>9} {row['driver_peak_rss_mb']:>14.0f} {row['driver_peak_rss_mb'] / base['driver_peak_rss_mb']:>6.2f} "
            f"{row['worker_peak_rss_mb']:>14.0f} {row['worker_peak_rss_mb'] / base['worker_peak_rss_mb']:>6.2f} "
            f"{1000 * row['generate_s_per_question']:>9.2f} {row['generate_s_per_question'] / base['generate_s_per_question']:>6.2f} "
            f"{1000 * row['train_s_per_question']:>11.2f} {row['train_s_per_question'] / base['train_s_per_question']:>6.2f} "
            f"{row['records_mb']:>11.1f} {row['index_s']:>8.1f} {row['wall_s']:>7.0f}"
        )


if __name__ == "__main__":
    main()
