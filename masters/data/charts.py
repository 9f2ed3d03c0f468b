"""Bar and line charts of 3-5 labelled integer values (1..8) with a gridline at every integer."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from masters.data.family import Family, Generated
from masters.data.render import GLYPH_WIDTH, INK_BOTTOM, INK_TOP, dark_colour, draw_text, light_background
from masters.data.shapes import COLOURS

LABELS = ("a", "b", "c", "d", "e")
MAX_VALUE = 8
KINDS = ("bar", "line")
EXTREMES = ("highest", "lowest")

VOCABULARY = (*LABELS, *EXTREMES, "what", "is", "the", "value", "of", "which", "label", "difference", "between", "and")


def render_chart(rng: random.Random, kind: str, values: list[int], image_size: int) -> Image.Image:
    scale = max(1, image_size // 64)
    image = light_background(rng, image_size)
    draw = ImageDraw.Draw(image)
    ink = dark_colour(rng)
    ink_middle = (INK_TOP + INK_BOTTOM) // 2
    baseline = image_size - 12 * scale  # leaves a glyph row under the axis for the labels
    top = 5 * scale  # room for half a digit above the top gridline
    axis_x = GLYPH_WIDTH * scale + 2 * scale

    def y_of(value: int) -> int:
        # Rounded so a bar's top lies exactly on its gridline.
        return round(baseline - value * (baseline - top) / MAX_VALUE)

    for value in range(1, MAX_VALUE + 1):
        draw.line((axis_x, y_of(value), image_size - 1, y_of(value)), fill=(200, 200, 200), width=1)
    for value in (0, MAX_VALUE // 2, MAX_VALUE):
        draw_text(image, (0, y_of(value) - ink_middle * scale), str(value), ink, scale)
    draw.line((axis_x, top, axis_x, baseline), fill=ink, width=scale)
    draw.line((axis_x, baseline, image_size - 1, baseline), fill=ink, width=scale)

    left, right = axis_x + 2 * scale, image_size - 2 * scale
    slot = (right - left) / len(values)
    centres = [left + (i + 0.5) * slot for i in range(len(values))]
    colour = rng.choice(list(COLOURS.values()))
    if kind == "bar":
        half = 0.3 * slot
        for centre, value in zip(centres, values, strict=True):
            draw.rectangle((round(centre - half), y_of(value), round(centre + half), baseline - 1), fill=colour)
    else:
        points = [(round(c), y_of(v)) for c, v in zip(centres, values, strict=True)]
        draw.line(points, fill=colour, width=scale)
        marker = 1 + scale
        for x, y in points:
            draw.rectangle((x - marker, y - marker, x + marker, y + marker), fill=colour)
    for centre, label in zip(centres, LABELS, strict=False):
        draw_text(image, (round(centre - GLYPH_WIDTH * scale / 2), baseline + scale), label, ink, scale)
    return image


def _chart(rng: random.Random) -> tuple[str, list[str], list[int]]:
    """A chart kind, its labels and random values."""
    kind = rng.choice(KINDS)
    values = [rng.randint(1, MAX_VALUE) for _ in range(rng.randint(3, len(LABELS)))]
    return kind, list(LABELS[: len(values)]), values


def value(rng: random.Random, image_size: int) -> Generated:
    """what is the value of c? -> 1..8."""
    kind, labels, values = _chart(rng)
    index = rng.randrange(len(labels))
    meta = {"kind": kind, "labels": labels, "values": values, "query": labels[index]}
    image = render_chart(rng, kind, values, image_size)
    return Generated(f"what is the value of {labels[index]}?", str(values[index]), image, meta)


def argmax(rng: random.Random, image_size: int) -> Generated:
    """which label is highest / lowest? -> a label; the extreme value is unique."""
    extreme = rng.choice(EXTREMES)
    pick = max if extreme == "highest" else min
    while True:
        kind, labels, values = _chart(rng)
        if values.count(pick(values)) == 1:
            break
    answer = labels[values.index(pick(values))]
    meta = {"kind": kind, "labels": labels, "values": values, "extreme": extreme}
    image = render_chart(rng, kind, values, image_size)
    return Generated(f"which label is {extreme}?", answer, image, meta)


def difference(rng: random.Random, image_size: int) -> Generated:
    """what is the difference between a and d? -> |value(a) - value(d)|, 0..7."""
    kind, labels, values = _chart(rng)
    first, second = rng.sample(range(len(labels)), 2)
    meta = {"kind": kind, "labels": labels, "values": values, "query": [labels[first], labels[second]]}
    image = render_chart(rng, kind, values, image_size)
    question = f"what is the difference between {labels[first]} and {labels[second]}?"
    return Generated(question, str(abs(values[first] - values[second])), image, meta)


FAMILIES = (
    Family("chart_argmax", 1, argmax),
    Family("chart_value", 2, value),
    Family("chart_difference", 3, difference),
)
