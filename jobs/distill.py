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
import shutil
import sys
import time
from pathlib import Path

import ray
from transformers import AutoProcessor

from cluster.curriculum import train_stages
from cluster.evaluation import evaluate_models
from cluster.responses import ServiceAddress
from jobs.cli import add_ray_arguments, add_set_argument, check_paths_for_submitted_job, configure_console, connect_ray
from masters.config import ConfigError, MastersConfig, dump_config, format_resources, load_config
from masters.curriculum import STUDENT, CurriculumState, Stage, format_plan, plan_curriculum
from masters.data.source import QuestionIndex
from masters.eval import accuracy_row, format_accuracy_table
from masters.io import atomic_directory, atomic_write_json
from masters.models import check_shared_tokenizer
from masters.report import write_report
from masters.run_layout import STAGE_STUDENT, RunLayout
from masters.tracking import MetricsLogger, read_metrics
from masters.zoo import resolve_model_paths
from serve.app import start as start_teacher_service
from serve.levels import Catalog

logger = logging.getLogger("masters.distill")

# The run without --config: the method's defaults (masters/config.py) on the tiny zoo, plus the few
# values a 0.4M-parameter student needs instead of a 2B-8B one's (see the file).
EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
# A trained stage's console line: these values of `FinishedStage.summary` (means over its updates).
STAGE_LINE = (("loss", "loss"), ("R_acc", "mean_accuracy_reward"), ("R_distill", "mean_distill_reward"))


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
    add_set_argument(parser, "the run")
    add_ray_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the curriculum plan and resources, start nothing")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. Validate everything that can be validated before any Ray resource starts.
    try:
        config = load_config(args.config or EMBEDDED_DEFAULT, args.set)
        plan = plan_curriculum(config, config.data.train_size)
        check_paths_for_submitted_job(config)
        if args.print_config or args.dry_run:
            print(dump_config(config) if args.print_config else f"{format_plan(plan)}\n\n{format_resources(config)}")
            return 0
        layout = RunLayout.of(config)
        layout.create(dump_config(config), [stage.to_dict() for stage in plan])
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_console(layout.log_file, args.verbose)
    logger.info("run %r in %s (log: %s)", config.name, layout.root, layout.log_file)

    # 2. Models: build the zoo on first use, then check that everyone shares the tokenizer.
    model_paths = resolve_model_paths(config, build_missing=True)
    check_shared_tokenizer({name: AutoProcessor.from_pretrained(path) for name, path in model_paths.items()})

    connect_ray(args.address, args.verbose, layout.ray_logs)
    try:
        test_results = distill(config, plan, layout, model_paths)
    finally:
        ray.shutdown()
    print(f"\n{format_accuracy_table(test_results)}\n\nstudent: {layout.student}\nreport:  {layout.report_file}")
    return 0


def distill(
    config: MastersConfig, plan: list[Stage], layout: RunLayout, model_paths: dict[str, Path], *, reference: dict[str, dict] | None = None
) -> dict[str, dict]:
    """Steps 3-5 on a connected Ray cluster: serve, generate, train stage by stage, evaluate, report.

    Returns the test rows (`accuracy_row`) of the reference models and the final student. `reference`,
    when given, are those rows of the initial student and the teachers already measured on this test
    split, and the teacher service already serves every model id the plan needs (jobs/ablate.py runs
    many plans against one service); otherwise this run starts the service and measures them itself.
    """
    metrics = MetricsLogger(layout.metrics_file, config.name, config.logging, config.model_dump(mode="json"))
    try:
        state = CurriculumState.load(layout.state_file) if layout.state_file.exists() else CurriculumState.fresh(plan)
        pending = [stage for stage in plan if stage.stage_id not in state.completed]

        # 3. The teacher service (every teacher at every level of its schedule, and the initial student),
        # then the reference accuracies, once per run. A rerun of a finished run needs no service.
        if pending and reference is None:
            started = time.perf_counter()
            url = start_teacher_service(config, model_paths)
            model_ids = Catalog.from_config(config).model_ids
            logger.info("teacher service at %s in %.0f s: %s", url, time.perf_counter() - started, ", ".join(model_ids))
        if reference is None:
            reference = reference_rows(config, layout, model_paths)

        # 4. The curriculum: records generated ahead of one Ray Train run through all pending stages;
        # each stage's student is evaluated and the curriculum position recorded as it is published.
        finished_dir = layout.stage_output(state.completed[-1]) if state.completed else None
        student_dir = finished_dir / STAGE_STUDENT if finished_dir else model_paths[STUDENT]
        if pending:
            questions = QuestionIndex.open(config.data, "train", config.data.train_size, config.storage_path)
            for finished in train_stages(config, pending, questions, layout, ServiceAddress(), model_paths[STUDENT], finished_dir):
                val = evaluate_models(config, {"student": finished.trained.student_dir}, "val", config.data.val_size)["student"]
                summary = finished.summary(val["accuracy"])
                metrics.log("stage", **summary)
                for step_metrics in finished.trained.metrics:
                    metrics.log("train_step", stage_id=finished.stage.stage_id, **step_metrics)
                state.complete(finished.stage, plan)
                state.save(layout.state_file)
                student_dir = finished.trained.student_dir
                trained = ", ".join(f"{name} {summary[key]:.3f}" for name, key in STAGE_LINE if summary[key] is not None)
                logger.info("stage %-12s trained: %d steps, %s; val accuracy %.1f%%", finished.stage.stage_id,
                            summary["steps"], trained, 100 * val["accuracy"])  # fmt: skip

        # 5. The final student, its test accuracy next to the reference models', the report.
        with atomic_directory(layout.student) as tmp:
            shutil.copytree(student_dir, tmp, dirs_exist_ok=True)
        final = evaluate_models(config, {"final student": layout.student}, "test", config.data.test_size)
        atomic_write_json(layout.final_test, final)
        test_results = {**reference, "final student": accuracy_row(final["final student"])}
        metrics.log("final", **{f"test_accuracy/{name}": row["overall"] for name, row in test_results.items()})
        families = sorted({family for row in test_results.values() for family in row["per_family"]})
        stages_plotted = [{"index": s.index, "teacher": s.teacher, "mask_ratio": s.mask_ratio} for s in plan]
        stage_metrics = read_metrics(layout.metrics_file, "stage")
        write_report(layout.report_file, config.name, test_results, families, stage_metrics, stages_plotted, dump_config(config))
        return test_results
    finally:
        metrics.close()


# --------------------------------------------------------------------------- the steps above, spelled out


def reference_rows(config: MastersConfig, layout: RunLayout, model_paths: dict[str, Path]) -> dict[str, dict]:
    """The initial student's and the teachers' test rows, evaluated once per run."""
    if not layout.baseline_test.exists():
        logger.info("evaluating the initial student and the teachers on the test split")
        models = {"initial student": model_paths[STUDENT], **{t.name: model_paths[t.name] for t in config.models.teachers}}
        atomic_write_json(layout.baseline_test, evaluate_models(config, models, "test", config.data.test_size))
    return {name: accuracy_row(report) for name, report in json.loads(layout.baseline_test.read_text()).items()}


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    logger.info("finished in %.1f min", (time.perf_counter() - started) / 60)
    sys.exit(code)
