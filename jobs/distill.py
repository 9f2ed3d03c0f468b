"""Distil a VLM with Masters: masked teachers, restored stage by stage, and an offline-RL student.

With no arguments this runs the whole method on the embedded default: it builds the tiny model zoo
if missing, serves the mid and large teachers at every mask level, then for each teacher and stage
generates and scores the stage's groups (masked teacher and initial student), trains the
student, evaluates it and records the curriculum position; at the end it saves the student in
Hugging Face format, writes report.md with plots and prints the accuracy table.

    python jobs/distill.py                                  # the embedded default
    python jobs/distill.py --config configs/X.yaml --set train.lr=1e-5
    python jobs/distill.py --config configs/default.yaml --config configs/ablations/naive.yaml   # layered
    python jobs/distill.py --dry-run                        # the plan and the resources, nothing started
    ray job submit --working-dir . -- python jobs/distill.py --config configs/X.yaml

Re-running with the same run name resumes: finished stages are never redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import threading
from concurrent.futures import Future
from pathlib import Path

from transformers import AutoProcessor

from masters.config import ConfigError, MastersConfig, dump_config, load_config, relative_paths
from masters.curriculum import CurriculumState, Stage, format_plan, plan_curriculum
from masters.io import atomic_directory, atomic_write_json, atomic_write_text

logger = logging.getLogger("masters.distill")

# The run without --config: the method's defaults (masters/config.py) on the tiny zoo, plus the few
# values a 0.4M-parameter student needs instead of a 2B-8B one's (see the file).
EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
# Set by Ray's job supervisor in the environment of a driver started with `ray job submit`.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="distill.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every config field is documented in masters/config.py; `--print-config` shows them all resolved.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="YAML run config (default: configs/default.yaml, the embedded default on the tiny zoo); repeat to "
        "layer files, each overriding the ones before, e.g. --config configs/default.yaml --config configs/ablations/naive.yaml",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.lr=1e-4 (repeatable; values are YAML)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the curriculum plan and resources, start nothing")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--address", default=None, help="Ray address (default: the cluster under `ray job submit`, else a local one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. Validate everything that can be validated before any Ray resource starts.
    try:
        config = load_config(args.config or EMBEDDED_DEFAULT, args.set)
        plan = plan_curriculum(config, config.data.train_size)
        check_paths_for_submitted_job(config)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.dry_run:
        print(format_plan(plan))
        print()
        print(format_resources(config))
        return 0

    run_dir = prepare_run_dir(config, plan)
    logger.info("run %r in %s", config.name, run_dir)

    # 2. Models: build the zoo on first use, then check that everyone shares the tokenizer.
    model_paths = resolve_models(config)
    check_tokenizers(model_paths)

    import ray

    connect_ray(args.address)
    test_results = distill(config, plan, run_dir, model_paths)
    print()
    print(format_accuracy_table(test_results))
    print(f"\nstudent: {run_dir / 'student'}\nreport:  {run_dir / 'report.md'}")
    ray.shutdown()
    return 0


def distill(
    config: MastersConfig,
    plan: list[Stage],
    run_dir: Path,
    model_paths: dict[str, Path],
    *,
    reference: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Steps 3-5 on a connected Ray cluster: serve, generate, train stage by stage, evaluate, report.

    Returns the test rows (`as_row`) of the reference models and the final student. `reference`, when
    given, are those rows of the initial student and the teachers already measured on this test split,
    and the teacher service is already serving every model id the plan needs (jobs/ablate.py runs many
    plans against one service); otherwise this run starts the service and measures them itself.
    """
    from cluster.evaluation import evaluate_models
    from cluster.responses import ServiceAddress
    from cluster.stage_store import read_manifest
    from cluster.train import RecordsGate, TrainingStage, train_curriculum
    from masters.data.source import QuestionIndex
    from masters.report import write_report
    from masters.tracking import MetricsLogger, read_metrics
    from serve.app import start as start_teacher_service
    from serve.levels import STUDENT, Catalog

    metrics = MetricsLogger(run_dir, config.name, config.logging, config.model_dump(mode="json"))

    # Where the run is: a rerun of a finished run needs no teacher service and no generation.
    state_path = run_dir / "state.json"
    state = CurriculumState.load(state_path) if state_path.exists() else CurriculumState.fresh(plan)
    pending = [stage for stage in plan if stage.stage_id not in state.completed]

    # 3. The teacher service: every teacher at every level of its schedule, plus the initial student.
    address = ServiceAddress()  # Serve handles: no HTTP hop inside the cluster
    if pending and reference is None:
        base_url = start_teacher_service(config, model_paths)
        logger.info("teacher service at %s; model ids %s", base_url, ", ".join(Catalog.from_config(config).model_ids))

    # Reference accuracies: the initial student and the teachers, once per run.
    if reference is None:
        baseline = cached_json(run_dir / "eval" / "baseline_test.json")
        if baseline is None:
            logger.info("evaluating the initial student and the teachers on the test split")
            baseline = evaluate_models(
                config,
                {"initial student": model_paths[STUDENT], **{t.name: model_paths[t.name] for t in config.models.teachers}},
                "test",
                config.data.test_size,
            )
            save_json(run_dir / "eval" / "baseline_test.json", baseline)
        reference = {name: as_row(report) for name, report in baseline.items()}

    # 4. The curriculum. Records never depend on the student being trained (its own responses come
    # from its initial weights), so the driver generates stage after stage ahead of the trainer, and
    # one Ray Train run goes through all stages, publishing each stage's student as it finishes; the
    # driver evaluates it and records the curriculum position. Training continues from the last
    # finished stage's output, or from the initial student.
    finished_dir = stage_output(run_dir, state.completed[-1]) if state.completed else None
    student_dir = finished_dir / "student" if finished_dir else model_paths[STUDENT]
    if pending:
        # The train split's ids and where each lives; Ray Data tasks read the questions themselves.
        questions = QuestionIndex.open(config.data, "train", config.data.train_size, config.storage_path)
        records_gate = RecordsGate.remote()
        records_dirs: dict[str, Path] = {}  # stage id -> its records, filled as the generation thread hands them over
        generation = start_thread(
            "generate", generate_stages, config, pending, questions, run_dir, address, model_paths[STUDENT], records_gate, records_dirs
        )
        training = start_thread(
            "train",
            train_curriculum,
            config,
            [TrainingStage(stage.stage_id, stage.optimizer_steps, str(stage_output(run_dir, stage.stage_id))) for stage in pending],
            records_gate,
            student_in=student_dir,
            reference=model_paths[STUDENT],
            run_name=f"{config.name}-student",
            storage_path=str(run_dir / "ray_train"),
            finished_stage_dir=finished_dir,
        )
        for stage in pending:
            trained = wait_for_stage(stage, run_dir, generation, training)
            val = evaluate_models(config, {"student": trained.student_dir}, "val", config.data.val_size)["student"]
            stage_summary = summarize_stage(stage, trained, read_manifest(records_dirs[stage.stage_id]), val)
            metrics.log("stage", **stage_summary)
            for step_metrics in trained.metrics:
                metrics.log("train_step", stage_id=stage.stage_id, **step_metrics)
            student_dir = trained.student_dir
            state.complete(stage, plan)
            state.save(state_path)
            logger.info(
                "stage %s done: val accuracy %.1f%%, %d steps", stage.stage_id, 100 * val["accuracy"], trained.steps
            )
        training.result()

    # 5. The final student, its test accuracy next to the reference models', the report.
    final_dir = publish_student(student_dir, run_dir / "student")
    final = evaluate_models(config, {"final student": final_dir}, "test", config.data.test_size)
    test_results = {**reference, **{name: as_row(report) for name, report in final.items()}}
    save_json(run_dir / "eval" / "final_test.json", final)
    metrics.log("final", **{f"test_accuracy/{name}": row["overall"] for name, row in test_results.items()})
    families = sorted({family for row in test_results.values() for family in row["per_family"]})
    write_report(
        run_dir,
        config.name,
        test_results,
        families,
        [m for m in read_metrics(run_dir, "stage")],
        [{"index": s.index, "teacher": s.teacher, "mask_ratio": s.mask_ratio} for s in plan],
        dump_config(config),
    )
    metrics.close()
    return test_results


# --------------------------------------------------------------------------- the steps above, spelled out


def format_resources(config: MastersConfig) -> str:
    """What each part asks Ray for (the autoscaler provides nodes to match)."""
    serve, train, rewards = config.serve, config.train, config.rewards
    models = len(config.models.teachers) + 1
    replicas = serve.max_replicas if serve.max_replicas is not None else serve.replicas
    rows = [
        ("part", "count", "per unit", "custom resources"),
        (
            f"teacher service ({serve.engine})",
            f"{models} models x {replicas} replicas",
            f"{serve.num_cpus} CPU, {serve.num_gpus} GPU, TP {serve.tensor_parallel_size}",
            str(serve.resources or "-"),
        ),
        ("reward actors", str(rewards.actors), f"{rewards.actor_num_cpus} CPU", str(rewards.actor_resources or "-")),
        (
            f"trainer ({train.strategy}{'-zero' + str(train.zero_stage) if train.strategy == 'deepspeed' else ''})",
            f"{train.num_workers} workers",
            f"{train.cpus_per_worker} CPU, {1 if train.use_gpu else 0} GPU",
            str(train.resources_per_worker or "-"),
        ),
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def check_paths_for_submitted_job(config: MastersConfig) -> None:
    """Under `ray job submit` every path must be absolute, on storage every node mounts.

    A submitted driver runs in a temporary copy of its working directory (or Ray's session directory)
    on the head node: a relative path would put the run and the zoo there, where no other node sees them
    and Ray deletes them after the job.
    """
    if RAY_JOB_ENV_VAR not in os.environ:
        return
    relative = relative_paths(config)
    if relative:
        listed = ", ".join(f"{field}={path!r}" for field, path in relative.items())
        raise ConfigError(
            f"under `ray job submit` these paths are relative: {listed}. The job runs in a temporary copy of its "
            "working directory that other nodes do not see and Ray deletes afterwards; give absolute paths on "
            "storage every node mounts, e.g. --set storage_path=/mnt/runs --set models.zoo_dir=/mnt/zoo "
            "(docs/cluster.md, 'Paths')"
        )


def prepare_run_dir(config: MastersConfig, plan: list[Stage]) -> Path:
    """`<storage_path>/<name>/` with the resolved config and the plan; a rerun must keep the same config."""
    run_dir = Path(config.storage_path) / config.name
    config_yaml = dump_config(config)
    saved = run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != config_yaml:
        raise SystemExit(
            f"error: run {config.name!r} exists in {run_dir} with another config; "
            "resume it with the same config, or choose a new name with --set name=<new>"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, config_yaml)
    atomic_write_json(run_dir / "plan.json", [stage.to_dict() for stage in plan])
    return run_dir


def resolve_models(config: MastersConfig) -> dict[str, Path]:
    """Model directories by served name (teachers and `student`), building the zoo if a `zoo:` ref needs it."""
    from masters.zoo import ZOO_PREFIX, ensure_zoo, load_zoo_config
    from serve.app import resolve_model_paths

    refs = [teacher.model for teacher in config.models.teachers] + [config.models.student]
    if any(ref.startswith(ZOO_PREFIX) for ref in refs):
        ensure_zoo(load_zoo_config(config.models.zoo_config), config.models.zoo_dir)
    return resolve_model_paths(config)


def check_tokenizers(model_paths: dict[str, Path]) -> None:
    from masters.models import check_shared_tokenizer

    check_shared_tokenizer({name: AutoProcessor.from_pretrained(path) for name, path in model_paths.items()})


def connect_ray(address: str | None) -> None:
    """The running cluster under `ray job submit` (RAY_ADDRESS is set), a new local instance otherwise."""
    import ray

    if address is None and "RAY_ADDRESS" not in os.environ:
        # "local": a new instance even if a `ray start` cluster runs here (join one with --address auto).
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address or "auto", configure_logging=False)


def cached_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def save_json(path: Path, payload) -> None:
    atomic_write_json(path, payload)


def stage_output(run_dir: Path, stage_id: str) -> Path:
    """Where the trainer publishes a stage's student (`student/`) and step metrics."""
    return run_dir / "checkpoints" / stage_id.replace("/", "-")


def start_thread(name: str, function, *args, **kwargs) -> Future:
    """Run `function` in a daemon thread: a failure elsewhere ends the driver without waiting for it."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def generate_stages(
    config: MastersConfig, stages: list[Stage], questions, run_dir: Path, address, student_dir: Path, records_gate, records_dirs: dict
) -> None:
    """Generate (or find) the stages' records in one pipeline, handing each to the trainer (and noting its
    directory in `records_dirs`) as it is written."""
    from cluster.pipeline import run_stages

    def hand_over(stage: Stage, records) -> None:
        logger.info(
            "stage %s (%s): %s records in %s%s",
            stage.stage_id,
            stage.model_id,
            records.manifest["counts"]["records"],
            records.directory,
            " (already generated)" if records.skipped else "",
        )
        records_dirs[stage.stage_id] = Path(records.directory)
        records_gate.ready.remote(stage.stage_id, str(Path(records.directory).resolve()))

    try:
        run_stages(config, stages, questions, run_dir, address, student_dir, on_stage_done=hand_over)
    except Exception as error:
        records_gate.fail.remote(f"{type(error).__name__}: {error}")
        raise


def wait_for_stage(stage: Stage, run_dir: Path, generation: Future, training: Future):
    """The stage's published training result; raises what stopped generation or training first."""
    from cluster.train import StageTrainResult

    while (trained := StageTrainResult.read(stage_output(run_dir, stage.stage_id))) is None:
        for future in (generation, training):
            if future.done() and future.exception() is not None:
                raise future.exception()
        if training.done():
            raise RuntimeError(f"training ended without publishing stage {stage.stage_id}")
        time.sleep(0.5)
    return trained


def summarize_stage(stage: Stage, trained, manifest: dict, val: dict) -> dict:
    """One line of metrics.jsonl per stage: what the report plots."""

    def mean(key: str) -> float | None:
        values = [m[key] for m in trained.metrics if key in m]
        return sum(values) / len(values) if values else None

    return {
        "stage_id": stage.stage_id,
        "teacher": stage.teacher,
        "mask_ratio": stage.mask_ratio,
        "steps": trained.steps,
        "val_accuracy": val["accuracy"],
        "mean_accuracy_reward": mean("accuracy_reward"),
        "mean_distill_reward": mean("distill_reward"),
        "mean_divergence": mean("divergence"),
        "loss": mean("loss"),
        "records": manifest["counts"]["records"],
    }


def publish_student(student_dir: Path, target: Path) -> Path:
    """Copy the last stage's student to `<run>/student/` in one rename."""
    with atomic_directory(target) as tmp:
        shutil.copytree(student_dir, tmp, dirs_exist_ok=True)
    return target


def as_row(report: dict) -> dict:
    return {
        "overall": report["accuracy"],
        "per_family": {family: score["accuracy"] for family, score in report["per_family"].items()},
    }


def format_accuracy_table(results: dict[str, dict]) -> str:
    families = sorted({family for row in results.values() for family in row["per_family"]})
    name_width = max(len(name) for name in results)
    header = "model".ljust(name_width) + "  overall  " + "  ".join(f[:12].rjust(12) for f in families)
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        cells = "  ".join(f"{100 * row['per_family'].get(f, float('nan')):12.1f}" for f in families)
        lines.append(f"{name.ljust(name_width)}  {100 * row['overall']:6.1f}%  {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    logger.info("finished in %.1f min", (time.perf_counter() - started) / 60)
    sys.exit(code)
