"""Run an ablation ladder: every rung at every seed on one base config, in one Ray session.

The zoo is built once, the teacher service is started once (serving the widest rung's model ids, which
cover every other rung's), and the reference models (initial student, teachers) are evaluated once.
All runs write their records into the ladder's shared `records/`, so rungs that would generate a stage
alike share it: a ladder costs one generation pass per seed plus training per rung. At the end it writes
`summary.json`, `summary.md` and `summary.png` (mean and 95% interval over seeds, overall and per family)
under `<storage_path>/<ladder>/` and prints the table.

    python jobs/ablate.py                                   # the default ladder on the embedded default
    python jobs/ablate.py --dry-run                         # the runs and the records they share, nothing started
    python jobs/ablate.py --ladder my_ladder.yaml --seeds 0 1 2 3 4 --rungs naive full_mid_large
    python jobs/ablate.py --set data.train_size=1024        # applied to every run of the ladder

Re-running resumes: finished runs are read back, unfinished ones resume from their last finished stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from masters.ablation import (
    LadderConfig,
    format_diagnostics,
    format_summary,
    ladder_dir,
    load_ladder,
    plot_summary,
    rung_config,
    run_diagnostics,
    summarize,
)
from jobs.cli import add_ray_arguments, add_set_argument, check_paths_for_submitted_job, configure_console, connect_ray
from masters.config import ConfigError, MastersConfig, dump_config, load_config
from masters.curriculum import CurriculumState, Stage, plan_curriculum
from masters.io import atomic_write_json, atomic_write_text
from masters.run_layout import RunLayout

logger = logging.getLogger("masters.ablate")

DEFAULT_LADDER = Path(__file__).resolve().parents[1] / "configs" / "ablations" / "ladder.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ablate.py",
        description=__doc__.split("\n\n")[0],
        epilog="The ladder file format is documented in masters/ablation.py and docs/ablations.md.",
    )
    parser.add_argument("--ladder", type=Path, default=DEFAULT_LADDER, help="ladder YAML (default: configs/ablations/ladder.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the ladder's)")
    parser.add_argument("--rungs", nargs="+", help="run only these rungs (default: all of the ladder's)")
    add_set_argument(parser, "every run of the ladder")
    add_ray_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="list the runs and the records they share, start nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. Every run's config and plan, validated before anything starts.
    try:
        ladder = load_ladder(args.ladder, args.seeds, args.rungs)
        runs = {
            (rung, seed): rung_config(ladder, rung, seed, args.set)
            for rung, file in ladder.rungs.items()
            if file is not None
            for seed in ladder.seeds
        }
        plans = {key: plan_curriculum(config, config.data.train_size) for key, config in runs.items()}
        for config in runs.values():
            check_paths_for_submitted_job(config)
        base = load_config(ladder.base, args.set)
        check_comparable(base, runs)
        service_config = widest(base, runs)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    directory = ladder_dir(ladder, base)
    if args.dry_run:
        print(format_runs(ladder, runs, plans))
        return 0
    layouts = {key: RunLayout.of(config) for key, config in runs.items()}
    try:  # a run that exists with another config stops the ladder before anything starts
        for key, layout in layouts.items():
            layout.create(dump_config(runs[key]), [stage.to_dict() for stage in plans[key]])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import ray
    from transformers import AutoProcessor

    from cluster.evaluation import evaluate_models
    from jobs.distill import distill
    from masters.curriculum import STUDENT
    from masters.models import check_shared_tokenizer
    from masters.tracking import read_metrics
    from masters.zoo import resolve_model_paths
    from serve.app import start as start_teacher_service

    directory.mkdir(parents=True, exist_ok=True)
    configure_console(directory / "ablate.log", args.verbose)
    started = time.perf_counter()
    model_paths = resolve_model_paths(service_config, build_missing=True)
    check_shared_tokenizer({name: AutoProcessor.from_pretrained(path) for name, path in model_paths.items()})
    connect_ray(args.address, args.verbose, directory / "ray_logs")

    try:
        # 2. The reference models, evaluated once for the whole ladder.
        reference_path = directory / "reference_test.json"
        if not reference_path.exists():
            logger.info("evaluating the initial student and the teachers on the test split")
            teachers = {t.name: model_paths[t.name] for t in service_config.models.teachers}
            reports = evaluate_models(service_config, {"initial student": model_paths[STUDENT], **teachers}, "test", base.data.test_size)
            atomic_write_json(reference_path, reports)
        reference = {name: ladder_row(report) for name, report in json.loads(reference_path.read_text()).items()}

        # 3. The runs, seed by seed; finished runs are read back.
        results: dict[str, dict[int, dict]] = {rung: {} for rung in ladder.rungs}
        diagnostics: dict[str, dict[int, dict]] = {rung: {} for rung in ladder.rungs}
        service_started = False
        for seed in ladder.seeds:
            for rung, file in ladder.rungs.items():
                if file is None:
                    results[rung][seed] = reference["initial student"]
                    continue
                config, plan, layout = runs[(rung, seed)], plans[(rung, seed)], layouts[(rung, seed)]
                if not is_finished(layout, plan):
                    if not service_started:
                        start_teacher_service(service_config, model_paths)
                        service_started = True
                    logger.info("run %s (%d stages) in %s", config.name, len(plan), layout.root)
                    distill(config, plan, layout, model_paths, reference=reference)
                results[rung][seed] = ladder_row(json.loads(layout.final_test.read_text())["final student"])
                diagnostics[rung][seed] = run_diagnostics(read_metrics(layout.metrics_file, "train_step"))
                write_summary(directory, ladder, results, diagnostics, reference)
    finally:
        ray.shutdown()

    summary = write_summary(directory, ladder, results, diagnostics, reference)
    print()
    print(format_summary(summary, reference))
    print()
    print(format_diagnostics(diagnostics))
    print(f"\nladder: {directory} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


# --------------------------------------------------------------------------- the steps above, spelled out


def check_comparable(base: MastersConfig, runs: dict[tuple[str, int], MastersConfig]) -> None:
    """Every rung must train the same initial student on the same data and be scored on the same test split."""
    for (rung, seed), config in runs.items():
        for field in ("data", "models.student", "models.zoo_config", "models.zoo_dir"):
            ours, theirs = _field(config, field), _field(base, field)
            if ours != theirs:
                raise ConfigError(
                    f"rung {rung!r} changes {field} ({theirs!r} -> {ours!r}); the rungs of a ladder must share the data, "
                    "the initial student and the zoo, or their accuracies are not comparable: run it as its own ladder"
                )


def _field(config: MastersConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def widest(base: MastersConfig, runs: dict[tuple[str, int], MastersConfig]) -> MastersConfig:
    """The run config whose teacher service serves every model id (teacher level) any run asks for."""
    from serve.levels import Catalog

    needed = set().union(*(Catalog.from_config(c).model_ids for c in runs.values())) if runs else set()
    for config in [*runs.values(), base]:
        if needed <= set(Catalog.from_config(config).model_ids):
            return config
    raise ConfigError(
        f"no rung serves every teacher level the ladder needs ({sorted(needed)}); one service must cover them all: "
        "give the rungs the same teachers and mask.mask_step, or split the ladder"
    )


def format_runs(ladder: LadderConfig, runs: dict[tuple[str, int], MastersConfig], plans: dict[tuple[str, int], list[Stage]]) -> str:
    """The runs of the ladder and, per stage record, which runs share it (the --dry-run listing)."""
    from cluster.pipeline import stage_records
    from masters.data.source import question_ids

    rows = [("run", "objective", "teachers", "stages", "updates")]
    users: dict[Path, list[str]] = {}
    train_ids: dict[str, list[str]] = {}
    for rung, file in ladder.rungs.items():
        for seed in ladder.seeds:
            if file is None:
                rows.append((f"{rung} (seed {seed})", "evaluated only", "-", "0", "0"))
                continue
            config, plan = runs[(rung, seed)], plans[(rung, seed)]
            rows.append(
                (
                    config.name,
                    config.loss.objective,
                    " -> ".join(t.name for t in config.models.teachers),
                    str(len(plan)),
                    str(sum(stage.optimizer_steps for stage in plan)),
                )
            )
            key = config.data.model_dump_json()
            if key not in train_ids:
                train_ids[key] = question_ids(config.data, "train", config.data.train_size)
            for stage in plan:
                _, records = stage_records(config, stage, train_ids[key], RunLayout.of(config).records_root)
                users.setdefault(records, []).append(config.name)
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    by_runs: dict[tuple[str, ...], list[str]] = {}
    for records, names in users.items():
        by_runs.setdefault(tuple(names), []).append(f"{records.parent.name}/{records.name.split('-')[0]}")
    lines += ["", f"{len(users)} stage records generated for {sum(len(u) for u in users.values())} stage trainings:"]
    for names, stages in by_runs.items():
        lines.append(f"  {len(stages):>2} ({', '.join(stages)}): {' + '.join(names)}")
    return "\n".join(lines)


def is_finished(layout: RunLayout, plan: list[Stage]) -> bool:
    """Whether the run finished every stage and its final evaluation."""
    return (
        layout.final_test.exists()
        and layout.state_file.exists()
        and CurriculumState.load(layout.state_file).next_stage(plan) is None
    )


def ladder_row(report: dict) -> dict:
    """A model's test row (overall, per family) plus the share of its most common answer: near 1 is a
    model that answers the same whatever it is asked (the default student once did)."""
    from collections import Counter

    from masters.eval import accuracy_row
    from masters.judging import final_answer, normalize_answer

    answers = Counter(normalize_answer(final_answer(p["response"])) for p in report["predictions"])
    return {**accuracy_row(report), "top_answer_share": answers.most_common(1)[0][1] / len(report["predictions"])}


def write_summary(
    directory: Path, ladder: LadderConfig, results: dict[str, dict[int, dict]], diagnostics: dict[str, dict[int, dict]], reference: dict
) -> dict:
    """summary.json (per-seed rows, means, intervals, diagnostics), summary.md and summary.png of the runs finished so far."""
    finished = {rung: by_seed for rung, by_seed in results.items() if by_seed}
    summary = summarize(finished)
    atomic_write_json(
        directory / "summary.json",
        {"ladder": ladder.model_dump(), "reference": reference, "results": finished, "summary": summary, "diagnostics": diagnostics},
    )
    atomic_write_text(
        directory / "summary.md",
        f"# Ablation ladder {ladder.name}\n\nTest accuracy (%), mean ± 95% interval over seeds.\n\n"
        + format_summary(summary, reference)
        + "\n\n![ladder](summary.png)\n\nThe full objective's diagnostics (means over logged steps and seeds; "
        "docs/objective.md):\n\n"
        + format_diagnostics(diagnostics)
        + "\n",
    )
    plot_summary(summary, {k: v for k, v in reference.items() if k != "initial student"}, directory / "summary.png")
    return summary


if __name__ == "__main__":
    sys.exit(main())
