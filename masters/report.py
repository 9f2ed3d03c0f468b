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


# Every figure is built with the constrained layout engine, which sizes the margins around each axes
# (tick labels, axis labels, titles, legends, a twin axis's labels) so that no text overlaps other
# text or leaves the figure; legends sit outside the plotting area so that they cover no data.
# The `*_figure` builders return the figure without writing anything (tests inspect its artists);
# the `plot_*` functions save it as a PNG.

_TICK_ROTATION = dict(rotation=30, ha="right", rotation_mode="anchor")
_REWARD_SERIES = (
    ("mean_accuracy_reward", "R_acc"),
    ("mean_distill_reward", "R_distill"),
    ("mean_divergence", "D (JSD)"),
)


def _legend_outside(axis, **kwargs):
    """A legend to the right of the plotting area, top-aligned (the layout engine makes room for it)."""
    return axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def stage_curves_figure(stage_metrics: list[dict]):
    """Top: student val accuracy per stage, with the teacher mask ratio on a twin axis (each axis
    coloured like its line). Bottom, when any stage has them: the mean rewards per stage. The stage
    ids label the shared x axis once, under the bottom panel."""
    labels = [str(m["stage_id"]) for m in stage_metrics]
    x = list(range(len(labels)))
    rewards = []
    for key, label in _REWARD_SERIES:
        values = [m.get(key) for m in stage_metrics]
        if any(v is not None for v in values):
            rewards.append((label, [float("nan") if v is None else v for v in values]))
    rows = 2 if rewards else 1
    size = (max(7.0, 0.4 * len(labels) + 4.0), 1.6 + 2.6 * rows)  # room for each stage's (rotated) id
    figure, axes = plt.subplots(rows, 1, sharex=True, squeeze=False, layout="constrained", figsize=size)
    acc_axis, bottom_axis = axes[0][0], axes[-1][0]

    acc_color, ratio_color = "C0", "dimgrey"
    acc_axis.plot(x, [100 * m["val_accuracy"] for m in stage_metrics], marker="o", color=acc_color)
    acc_axis.set_ylabel("student val accuracy (%)", color=acc_color)
    acc_axis.tick_params(axis="y", colors=acc_color)
    ratio_axis = acc_axis.twinx()
    ratios = [m["mask_ratio"] for m in stage_metrics]
    ratio_axis.step(x, ratios, where="mid", color=ratio_color, linestyle="--", alpha=0.8)
    ratio_axis.set_ylabel("teacher mask ratio", color=ratio_color)
    ratio_axis.tick_params(axis="y", colors=ratio_color)
    acc_axis.set_title("Student accuracy and teacher mask ratio per stage")
    acc_axis.grid(alpha=0.3)

    if rewards:
        reward_axis = axes[1][0]
        for label, values in rewards:
            reward_axis.plot(x, values, marker="o", label=label)
        reward_axis.set_ylabel("mean per stage")
        reward_axis.set_title("Rewards per stage")
        _legend_outside(reward_axis)
        reward_axis.grid(alpha=0.3)

    bottom_axis.set_xticks(x, labels, **_TICK_ROTATION)
    bottom_axis.set_xlabel("stage")
    return figure


def plot_stage_curves(stage_metrics: list[dict], out: Path) -> Path:
    """Validation accuracy and mean rewards after each stage, with the mask ratio on a second axis."""
    return _save_figure(stage_curves_figure(stage_metrics), out)


def mask_schedule_figure(stages: list[dict]):
    """The mask-restoration curriculum: ratio per stage, one colour per teacher."""
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(max(7.5, 0.3 * len(stages) + 5.0), 3.2), layout="constrained")
    teachers = list(dict.fromkeys(s["teacher"] for s in stages))
    for teacher in teachers:
        points = [(s["index"], s["mask_ratio"]) for s in stages if s["teacher"] == teacher]
        axis.step([p[0] for p in points], [p[1] for p in points], where="post", marker="o", label=teacher)
    if stages:  # whole stage numbers, half a stage of room either side (one stage alone included)
        indices = [s["index"] for s in stages]
        axis.set_xlim(min(indices) - 0.5, max(indices) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.set_xlabel("stage")
    axis.set_ylabel("mask ratio")
    axis.set_title("Mask-restoration schedule")
    if teachers:
        _legend_outside(axis, title="teacher")
    axis.grid(alpha=0.3)
    return figure


def plot_mask_schedule(stages: list[dict], out: Path) -> Path:
    """The mask-restoration curriculum: ratio per stage, one colour per teacher."""
    return _save_figure(mask_schedule_figure(stages), out)


def family_accuracy_figure(results: dict[str, dict], families: Sequence[str]):
    """Grouped bars: per-family test accuracy of each model (initial student, final student, teachers)."""
    figure, axis = plt.subplots(figsize=(max(7.0, 0.9 * len(families) + 3.5), 3.8), layout="constrained")
    width = 0.8 / max(1, len(results))
    for offset, (name, result) in enumerate(results.items()):
        values = [100 * result.get("per_family", {}).get(f, 0.0) for f in families]
        axis.bar([i + offset * width for i in range(len(families))], values, width=width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(families))], families, **_TICK_ROTATION)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Per-family accuracy")
    if results:
        _legend_outside(axis, title="model")
    axis.grid(axis="y", alpha=0.3)
    return figure


def plot_family_accuracy(results: dict[str, dict], families: Sequence[str], out: Path) -> Path:
    """Grouped bars: per-family test accuracy of each model (initial student, final student, teachers)."""
    return _save_figure(family_accuracy_figure(results, families), out)


def write_report(
    path: Path,
    run_name: str,
    test_results: dict[str, dict],
    families: Sequence[str],
    stage_metrics: list[dict],
    stages: list[dict],
    config_yaml: str,
) -> Path:
    """`path` (the run's `report.md`) with its plots next to it."""
    run_dir = Path(path).parent
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
    return atomic_write_text(path, "\n".join(lines))
