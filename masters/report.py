"""The end-of-run report: `report.md` with the accuracy table, and PNG plots people would rather look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402

from masters.io import atomic_write_bytes, atomic_write_text  # noqa: E402


def accuracy_table(results: dict[str, dict], families: Sequence[str]) -> str:
    """Markdown table: one row per model, overall accuracy then one column per family (in %)."""
    header = "| model | overall | " + " | ".join(families) + " |"
    rule = "|---|---:|" + "---:|" * len(families)
    rows = []
    for name, result in results.items():
        per_family = result.get("per_family", {})
        cells = [f"{100 * per_family[f]:.1f}" if f in per_family else "–" for f in families]
        rows.append(f"| {name} | {100 * result['overall']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def _save_figure(figure, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_stage_curves(stage_metrics: list[dict], out: Path) -> Path:
    """Validation accuracy and mean rewards after each stage, with the mask ratio on a second axis."""
    labels = [m["stage_id"] for m in stage_metrics]
    x = list(range(len(labels)))
    figure, (acc_axis, reward_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    acc_axis.plot(x, [100 * m["val_accuracy"] for m in stage_metrics], marker="o", label="student val accuracy")
    acc_axis.set_ylabel("accuracy (%)")
    ratio_axis = acc_axis.twinx()
    ratio_axis.step(x, [m["mask_ratio"] for m in stage_metrics], where="mid", color="grey", alpha=0.6, label="mask ratio")
    ratio_axis.set_ylabel("teacher mask ratio")
    acc_axis.set_title("Student accuracy per stage")
    for key, label in (("mean_accuracy_reward", "R_acc"), ("mean_distill_reward", "R_distill"), ("mean_divergence", "D (JSD)")):
        values = [m.get(key) for m in stage_metrics]
        if any(v is not None for v in values):
            reward_axis.plot(x, [float("nan") if v is None else v for v in values], marker="o", label=label)
    reward_axis.set_title("Rewards per stage")
    reward_axis.legend()
    for axis in (acc_axis, reward_axis):
        axis.set_xticks(x, labels, rotation=30, ha="right")
        axis.grid(alpha=0.3)
    return _save_figure(figure, out)


def plot_mask_schedule(stages: list[dict], out: Path) -> Path:
    """The mask-restoration curriculum: ratio per stage, one colour per teacher."""
    figure, axis = plt.subplots(figsize=(6, 3.2))
    teachers = list(dict.fromkeys(s["teacher"] for s in stages))
    for teacher in teachers:
        points = [(s["index"], s["mask_ratio"]) for s in stages if s["teacher"] == teacher]
        axis.step([p[0] for p in points], [p[1] for p in points], where="post", marker="o", label=teacher)
    axis.set_xlabel("stage")
    axis.set_ylabel("mask ratio")
    axis.set_title("Mask-restoration schedule")
    axis.legend()
    axis.grid(alpha=0.3)
    return _save_figure(figure, out)


def plot_family_accuracy(results: dict[str, dict], families: Sequence[str], out: Path) -> Path:
    """Grouped bars: per-family test accuracy of each model (initial student, final student, teachers)."""
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(families) + 2), 3.8))
    width = 0.8 / max(1, len(results))
    for offset, (name, result) in enumerate(results.items()):
        values = [100 * result.get("per_family", {}).get(f, 0.0) for f in families]
        axis.bar([i + offset * width for i in range(len(families))], values, width=width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(families))], families, rotation=30, ha="right")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Per-family accuracy")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    return _save_figure(figure, out)


def write_report(
    run_dir: Path,
    run_name: str,
    test_results: dict[str, dict],
    families: Sequence[str],
    stage_metrics: list[dict],
    stages: list[dict],
    config_yaml: str,
) -> Path:
    run_dir = Path(run_dir)
    plots = {
        "stages.png": plot_stage_curves(stage_metrics, run_dir / "stages.png") if stage_metrics else None,
        "mask_schedule.png": plot_mask_schedule(stages, run_dir / "mask_schedule.png"),
        "families.png": plot_family_accuracy(test_results, families, run_dir / "families.png"),
    }
    def number(value, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    stage_rows = "\n".join(
        f"| {m['stage_id']} | {m['mask_ratio']:.2f} | {m.get('steps', '–')} | {100 * m['val_accuracy']:.1f} | "
        f"{number(m.get('mean_accuracy_reward'), 3)} | {number(m.get('mean_divergence'), 4)} |"
        for m in stage_metrics
    )
    lines = [
        f"# Masters run `{run_name}`",
        "",
        "## Test accuracy (%)",
        "",
        accuracy_table(test_results, families),
        "",
        "![per-family accuracy](families.png)",
        "",
        "## Curriculum",
        "",
        "| stage | mask ratio | steps | val accuracy (%) | mean R_acc | mean D |",
        "|---|---:|---:|---:|---:|---:|",
        stage_rows,
        "",
    ]
    lines += [f"![{name}]({name})" for name, path in plots.items() if path is not None and name != "families.png"]
    lines += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))
