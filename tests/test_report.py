"""The run report's plots: every piece of text readable, i.e. no label, tick label, legend or title
overlapping another or falling outside the figure; and `write_report` writing the report with them."""

from __future__ import annotations

import itertools
import math
import random

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from masters import report  # noqa: E402

LONG_TEACHERS = ("internvl3_5-14b-instruct-masked", "internvl3_5-38b-instruct-masked")
THREE_TEACHERS = ("internvl3-14b-instruct", "internvl3-38b-instruct", "internvl3-78b-instruct")
FAMILIES = [
    "shapes_exist", "shapes_attribute", "shapes_count", "shapes_spatial", "shapes_compare", "shapes_two_hop",
    "chart_argmax", "chart_value", "chart_difference", "text_read", "text_sum",
]  # fmt: skip


def curriculum(teachers, per_teacher: int, rewards: bool = True, seed: int = 0):
    """Stage metrics and the plan, as `jobs/distill.py` hands them to the report."""
    rng = random.Random(seed)
    stages, metrics = [], []
    for teacher in teachers:
        for k in range(per_teacher):
            index = len(stages)
            ratio = round(0.3 - k * 0.3 / max(1, per_teacher - 1), 6)
            stages.append({"index": index, "teacher": teacher, "mask_ratio": ratio})
            metrics.append(
                {
                    "stage_id": f"{teacher}/{k}",
                    "teacher": teacher,
                    "mask_ratio": ratio,
                    "steps": 40,
                    "val_accuracy": min(1.0, 0.3 + 0.04 * index + rng.uniform(-0.02, 0.02)),
                    "mean_accuracy_reward": 0.4 + 0.03 * index if rewards else None,
                    "mean_distill_reward": -0.2 + 0.01 * index if rewards else None,
                    "mean_divergence": 0.25 - 0.01 * index if rewards else None,
                }
            )
    return metrics, stages


def model_results(teachers, families, seed: int = 0):
    rng = random.Random(seed)
    return {
        name: {"overall": rng.uniform(0.2, 0.9), "per_family": {f: rng.uniform(0.0, 1.0) for f in families}}
        for name in ("initial student", "final student", *teachers)
    }


# --------------------------------------------------------------------------- the text a figure draws


def _has_text(text) -> bool:
    return text.get_visible() and bool(text.get_text().strip())


def _in_view(axis, location: float) -> bool:
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, abs(high - low))
    return low - slack <= location <= high + slack


def text_artists(figure) -> list[tuple[str, object]]:
    """(group, artist) for every drawn text that matters: per axes (twins included) its title(s), axis
    labels, offset texts and the tick labels within its view, its legend; the figure's legends and texts.
    A group is one axes' one role, e.g. `axes 2 'teacher mask ratio' / y major tick labels`."""
    found: list[tuple[str, object]] = []
    for number, axes in enumerate(figure.axes):
        if not axes.get_visible():
            continue
        name = f"axes {number} '{axes.get_title() or axes.get_ylabel()}'"
        for role, text in (
            ("title", axes.title),
            ("left title", getattr(axes, "_left_title", None)),
            ("right title", getattr(axes, "_right_title", None)),
        ):
            if text is not None and _has_text(text):
                found.append((f"{name} / {role}", text))
        for letter, axis in (("x", axes.xaxis), ("y", axes.yaxis)):
            if not axis.get_visible():
                continue
            if _has_text(axis.label):
                found.append((f"{name} / {letter} label", axis.label))
            if _has_text(axis.offsetText):
                found.append((f"{name} / {letter} offset", axis.offsetText))
            for kind, ticks in (("major", axis.get_major_ticks()), ("minor", axis.get_minor_ticks())):
                for tick in ticks:
                    if not tick.get_visible() or not _in_view(axis, tick.get_loc()):
                        continue
                    for label in (tick.label1, tick.label2):
                        if _has_text(label):
                            found.append((f"{name} / {letter} {kind} tick labels", label))
        for text in axes.texts:
            if _has_text(text):
                found.append((f"{name} / text", text))
        legend = axes.get_legend()
        if legend is not None and legend.get_visible():
            found.append((f"{name} / legend", legend))
    for number, legend in enumerate(figure.legends):
        if legend.get_visible():
            found.append((f"figure legend {number}", legend))
    for number, text in enumerate(figure.texts):
        if _has_text(text):
            found.append((f"figure text {number}", text))
    suptitle = getattr(figure, "_suptitle", None)
    if suptitle is not None and _has_text(suptitle):
        found.append(("figure suptitle", suptitle))
    return found


def _rotated_box(text, renderer) -> list[tuple[float, float]]:
    """The corners, in display pixels, of a text's own (rotated) rectangle. Its axis-aligned window
    extent is the bounding box of that rectangle, so both share a centre; the rectangle's size is the
    extent of the same text unrotated."""
    rotation = text.get_rotation()
    box = text.get_window_extent(renderer)
    if rotation % 180 == 0:
        return [(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1)]
    text.set_rotation(0)
    try:
        flat = text.get_window_extent(renderer)
    finally:
        text.set_rotation(rotation)
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    w, h, a = flat.width / 2, flat.height / 2, math.radians(rotation)
    return [
        (cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a))
        for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h))
    ]


def _polygons_overlap(first, second, tolerance: float = 0.5) -> bool:
    """Convex polygons overlap (by more than `tolerance` pixels) unless some edge normal separates them."""
    for polygon in (first, second):
        for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
            nx, ny = y0 - y1, x1 - x0
            length = math.hypot(nx, ny) or 1.0
            a = [(x * nx + y * ny) / length for x, y in first]
            b = [(x * nx + y * ny) / length for x, y in second]
            if min(max(a), max(b)) - max(min(a), min(b)) <= tolerance:
                return False
    return True


def layout_problems(figure) -> list[str]:
    """Draw the figure and list every pair of overlapping texts and every text outside the figure.

    Texts of different groups must not even share bounding-box area (window extents, as drawn);
    within a group (say one axis's rotated tick labels, whose axis-aligned boxes overlap by
    construction) the texts' own rotated rectangles must not overlap."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    artists = text_artists(figure)
    boxes = [artist.get_window_extent(renderer) for _, artist in artists]
    label = lambda i: f"{artists[i][0]} {getattr(artists[i][1], 'get_text', lambda: '')()!r}"  # noqa: E731
    problems = []
    bounds = figure.bbox
    for i, box in enumerate(boxes):
        if box.x0 < bounds.x0 - 0.5 or box.y0 < bounds.y0 - 0.5 or box.x1 > bounds.x1 + 0.5 or box.y1 > bounds.y1 + 0.5:
            problems.append(f"outside the figure: {label(i)} at {box.bounds} (figure {bounds.bounds})")
    for i, j in itertools.combinations(range(len(artists)), 2):
        if artists[i][0] != artists[j][0]:
            width = min(boxes[i].x1, boxes[j].x1) - max(boxes[i].x0, boxes[j].x0)
            height = min(boxes[i].y1, boxes[j].y1) - max(boxes[i].y0, boxes[j].y0)
            if width > 0.5 and height > 0.5:
                problems.append(f"overlap: {label(i)} and {label(j)}")
        elif hasattr(artists[i][1], "get_rotation") and _polygons_overlap(
            _rotated_box(artists[i][1], renderer), _rotated_box(artists[j][1], renderer)
        ):
            problems.append(f"overlap: {label(i)} and {label(j)}")
    return problems


def _check(figure, expected_groups: set[str]) -> None:
    try:
        figure.canvas.draw()  # tick labels get their text when drawn
        groups = {group.split(" / ")[-1] for group, _ in text_artists(figure)}
        assert expected_groups <= groups, f"the figure lacks {expected_groups - groups}"
        problems = layout_problems(figure)
        assert not problems, "\n".join(problems)
    finally:
        plt.close(figure)


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_overlapping_and_escaping_text():
    """The check is not vacuous: two subplots crammed together, a twin label over the neighbour's
    ticks, and a title pushed off the figure are all reported."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(4, 2))
    figure.subplots_adjust(wspace=0.0)
    left.twinx().set_ylabel("a long twin-axis label")
    right.set_title("a title that is far too long to fit into this small figure at all")
    problems = layout_problems(figure)
    plt.close(figure)
    assert any("twin-axis label" in p and "tick labels" in p for p in problems), problems
    assert any(p.startswith("outside the figure") and "title" in p for p in problems), problems

    figure, axis = plt.subplots(figsize=(3, 2), layout="constrained")
    axis.set_xticks(range(12), [f"a rather long label {k}" for k in range(12)], rotation=30, ha="right")
    problems = layout_problems(figure)
    plt.close(figure)
    assert any("x major tick labels" in p and p.startswith("overlap") for p in problems), problems


# --------------------------------------------------------------------------- the report's plots

CURRICULA = {
    "two teachers x 4, long names": dict(teachers=LONG_TEACHERS, per_teacher=4),
    "three teachers x 6": dict(teachers=THREE_TEACHERS, per_teacher=6),
    "one stage": dict(teachers=LONG_TEACHERS[:1], per_teacher=1),
    "no reward metrics": dict(teachers=LONG_TEACHERS, per_teacher=3, rewards=False),
}


@pytest.mark.parametrize("case", CURRICULA)
def test_stage_plot_text_does_not_overlap(case):
    metrics, _ = curriculum(**CURRICULA[case])
    figure = report.stage_curves_figure(metrics)
    figure.canvas.draw()
    y_labels = [text.get_text() for group, text in text_artists(figure) if group.endswith("/ y label")]
    with_rewards = CURRICULA[case].get("rewards", True)
    expected = {"title", "y label", "x major tick labels", "y major tick labels"}
    _check(figure, expected | {"legend"} if with_rewards else expected)
    assert "teacher mask ratio" in y_labels and len(y_labels) >= 2, y_labels  # the twin axis is checked too


@pytest.mark.parametrize("case", [c for c in CURRICULA if c != "no reward metrics"])
def test_mask_schedule_plot_text_does_not_overlap(case):
    _, stages = curriculum(**CURRICULA[case])
    figure = report.mask_schedule_figure(stages)
    figure.canvas.draw()
    xaxis = figure.axes[0].xaxis
    stage_ticks = [t.label1.get_text() for t in xaxis.get_major_ticks() if _in_view(xaxis, t.get_loc())]
    _check(figure, {"title", "x label", "y label", "x major tick labels", "y major tick labels", "legend"})
    assert stage_ticks and all(text.isdigit() for text in stage_ticks), stage_ticks  # whole stage numbers


@pytest.mark.parametrize(
    "teachers, families", [(LONG_TEACHERS, FAMILIES), (THREE_TEACHERS, FAMILIES[:2]), (LONG_TEACHERS[:1], FAMILIES[:1])]
)
def test_family_plot_text_does_not_overlap(teachers, families):
    figure = report.family_accuracy_figure(model_results(teachers, families), families)
    _check(figure, {"title", "y label", "x major tick labels", "y major tick labels", "legend"})


def test_write_report_writes_the_plots_and_links_them(tmp_path):
    metrics, stages = curriculum(LONG_TEACHERS, 2)
    open_before = set(plt.get_fignums())
    results = model_results(LONG_TEACHERS, FAMILIES)
    path = report.write_report(tmp_path / "report.md", "demo", results, FAMILIES, metrics, stages, "name: demo\n")
    text = path.read_text()
    for name in ("families.png", "stages.png", "mask_schedule.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"]({name})" in text
    for m in metrics:
        assert f"| {m['stage_id']} |" in text
    assert "name: demo" in text and "| initial student |" in text
    assert set(plt.get_fignums()) == open_before, "the report leaves no figure open"
