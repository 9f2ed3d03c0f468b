"""Scenes of coloured shapes on a 3x3 grid and the six question families asked about them.

Positions are grid cells, so spatial relations are exact: "left of" means a column further left
(any row), "above" a row further up. Held-out (colour, shape) pairs never appear in train/val/test
scenes; held-out questions always refer to one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any

from PIL import Image, ImageDraw

from masters.data.family import Family, Generated
from masters.data.render import RGB, light_background

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 230),
    "yellow": (225, 195, 0),
    "purple": (150, 60, 200),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
ATTRIBUTES = ("colour", "shape", "size")
GRID = 3
MAX_OBJECTS = 7

Combination = tuple[str, str]  # (colour, shape)
ALL_COMBINATIONS: tuple[Combination, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
# One pair per shape and four different colours, so every colour and every shape is still seen in training.
HELDOUT_COMBINATIONS: tuple[Combination, ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "diamond"),
    ("yellow", "square"),
)
SEEN_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c not in HELDOUT_COMBINATIONS)

QUESTION_WORDS = (
    "is there a an how many are what colour shape size the object objects more than left right of above below"
)
VOCABULARY = (*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *SIZES, *QUESTION_WORDS.split(), "yes", "no")

Cell = tuple[int, int]  # (row, col)
CELLS: tuple[Cell, ...] = tuple((row, col) for row in range(GRID) for col in range(GRID))


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def combination(self) -> Combination:
        return (self.colour, self.shape)

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    def to_meta(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "row": self.row, "col": self.col}


def relation_holds(relation: str, subject: Cell, anchor: Cell) -> bool:
    """Whether the object in cell `subject` is `relation` the object in cell `anchor`."""
    (subject_row, subject_col), (anchor_row, anchor_col) = subject, anchor
    return {
        "left of": subject_col < anchor_col,
        "right of": subject_col > anchor_col,
        "above": subject_row < anchor_row,
        "below": subject_row > anchor_row,
    }[relation]


# --------------------------------------------------------------------------- scenes


def _place(rng: random.Random, combinations: list[Combination], cells: list[Cell] | None = None) -> list[SceneObject]:
    """Objects with the given (colour, shape) pairs in the given (or random distinct) cells, random sizes."""
    if cells is None:
        cells = rng.sample(CELLS, len(combinations))
    return [
        SceneObject(colour, shape, rng.choice(SIZES), row, col)
        for (colour, shape), (row, col) in zip(combinations, cells, strict=True)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill: RGB) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.85  # a square as wide as the circle looks bigger; this evens out the area
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=fill)
    else:  # diamond
        half_width = radius * 0.8
        draw.polygon([(cx, cy - radius), (cx + half_width, cy), (cx, cy + radius), (cx - half_width, cy)], fill=fill)


def render_scene(rng: random.Random, objects: list[SceneObject], image_size: int) -> Image.Image:
    image = light_background(rng, image_size)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in objects:
        # Small jitter so the grid is not pixel-perfect; it stays well inside the cell, so rows/columns are unambiguous.
        cx = (obj.col + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        radius = (0.22 if obj.size == "small" else 0.4) * cell
        _draw_shape(draw, obj.shape, cx, cy, radius, COLOURS[obj.colour])
    return image


def _generated(
    rng: random.Random,
    image_size: int,
    objects: list[SceneObject],
    question: str,
    answer: str,
    involves: list[Combination],
    **details: Any,
) -> Generated:
    """Render and package a scene question; objects are listed in reading order so meta does not leak the target."""
    objects = sorted(objects, key=lambda o: o.cell)
    meta = {
        "objects": [o.to_meta() for o in objects],
        "involves": [list(c) for c in involves],
        **details,
    }
    return Generated(question, answer, render_scene(rng, objects, image_size), meta)


def _matches(query: dict[str, str | None], combination: Combination) -> bool:
    colour, shape = combination
    return query["colour"] in (None, colour) and query["shape"] in (None, shape)


def _noun(query: dict[str, str | None], plural: bool) -> str:
    noun = query["shape"] or "object"
    noun = f"{noun}s" if plural else noun
    return f"{query['colour']} {noun}" if query["colour"] else noun


def _random_query(rng: random.Random) -> dict[str, str | None]:
    """A train-side query: by shape, by colour, or by a seen (colour, shape) pair."""
    kind = rng.choice(("shape", "colour", "combination"))
    if kind == "shape":
        return {"colour": None, "shape": rng.choice(SHAPES)}
    if kind == "colour":
        return {"colour": rng.choice(list(COLOURS)), "shape": None}
    colour, shape = rng.choice(SEEN_COMBINATIONS)
    return {"colour": colour, "shape": shape}


def _pair(rng: random.Random, heldout: bool) -> tuple[Combination, Combination]:
    """Two different pairs for a two-object question; in the held-out split one of them is held out."""
    if not heldout:
        first, second = rng.sample(SEEN_COMBINATIONS, 2)
        return first, second
    first = rng.choice(HELDOUT_COMBINATIONS)
    second = rng.choice([c for c in ALL_COMBINATIONS if c != first])
    return (first, second) if rng.random() < 0.5 else (second, first)


def _involved(*queries: dict[str, str | None]) -> list[Combination]:
    return [(q["colour"], q["shape"]) for q in queries if q["colour"] and q["shape"]]


# --------------------------------------------------------------------------- families


def exist(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """is there a red circle? -> yes/no (balanced)."""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    target = rng.choice(HELDOUT_COMBINATIONS if heldout else SEEN_COMBINATIONS)
    present = rng.random() < 0.5
    others = [c for c in pool if c != target]
    combinations = [rng.choice(others) for _ in range(rng.randint(1, 5))] + ([target] if present else [])
    objects = _place(rng, combinations)
    colour, shape = target
    article = "an" if colour[0] in "aeiou" else "a"
    question = f"is there {article} {colour} {shape}?"
    answer = "yes" if present else "no"
    return _generated(rng, image_size, objects, question, answer, [target], query={"colour": colour, "shape": shape})


def count(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """how many circles / red objects / red circles are there? -> 0..5."""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    if heldout:
        colour, shape = rng.choice(HELDOUT_COMBINATIONS)
        query: dict[str, str | None] = {"colour": colour, "shape": shape}
    else:
        query = _random_query(rng)
    matching = [c for c in pool if _matches(query, c)]
    others = [c for c in pool if not _matches(query, c)]
    number = rng.randint(0, 5)
    num_others = rng.randint(max(0, 2 - number), MAX_OBJECTS - number)
    combinations = [rng.choice(matching) for _ in range(number)] + [rng.choice(others) for _ in range(num_others)]
    objects = _place(rng, combinations)
    question = f"how many {_noun(query, plural=True)} are there?"
    return _generated(rng, image_size, objects, question, str(number), _involved(query), query=query)


def attribute(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """what colour is the triangle? / what shape is the red object? / what size is the red triangle?"""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    target = rng.choice(HELDOUT_COMBINATIONS if heldout else SEEN_COMBINATIONS)
    asked = rng.choice(ATTRIBUTES)
    colour, shape = target
    # The reference names what is not asked, and nothing else in the scene fits it, so the target is unique.
    reference: dict[str, str | None] = {
        "colour": {"colour": None, "shape": shape},
        "shape": {"colour": colour, "shape": None},
        "size": {"colour": colour, "shape": shape},
    }[asked]
    others = [c for c in pool if not _matches(reference, c)]
    combinations = [target] + [rng.choice(others) for _ in range(rng.randint(1, 5))]
    objects = _place(rng, combinations)
    target_object = objects[0]
    question = {
        "colour": f"what colour is the {shape}?",
        "shape": f"what shape is the {colour} object?",
        "size": f"what size is the {colour} {shape}?",
    }[asked]
    answer = getattr(target_object, asked)
    details = {"attribute": asked, "reference": reference, "target": target_object.to_meta()}
    return _generated(rng, image_size, objects, question, answer, [target], **details)


def spatial(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """is the red circle left of the blue square? -> yes/no (balanced)."""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    subject_pair, anchor_pair = _pair(rng, heldout)
    others = [c for c in pool if c not in (subject_pair, anchor_pair)]
    combinations = [subject_pair, anchor_pair] + [rng.choice(others) for _ in range(rng.randint(0, 4))]
    objects = _place(rng, combinations)
    subject, anchor = objects[0], objects[1]
    holding = [r for r in RELATIONS if relation_holds(r, subject.cell, anchor.cell)]
    want_yes = rng.random() < 0.5
    # Distinct cells make some relation hold; left/right (and above/below) exclude each other, so some fail.
    relation = rng.choice(holding if want_yes else [r for r in RELATIONS if r not in holding])
    question = f"is the {subject.colour} {subject.shape} {relation} the {anchor.colour} {anchor.shape}?"
    answer = "yes" if want_yes else "no"
    details = {"relation": relation, "subject": subject.to_meta(), "anchor": anchor.to_meta()}
    return _generated(rng, image_size, objects, question, answer, [subject_pair, anchor_pair], **details)


def compare(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """are there more circles than squares? (also by colour or by pair) -> yes/no; the counts never tie."""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    if heldout:
        (colour_a, shape_a), (colour_b, shape_b) = _pair(rng, heldout=True)
        first = {"colour": colour_a, "shape": shape_a}
        second = {"colour": colour_b, "shape": shape_b}
    else:
        kind = rng.choice(("shape", "colour", "combination"))
        if kind == "shape":
            shape_a, shape_b = rng.sample(SHAPES, 2)
            first, second = {"colour": None, "shape": shape_a}, {"colour": None, "shape": shape_b}
        elif kind == "colour":
            colour_a, colour_b = rng.sample(list(COLOURS), 2)
            first, second = {"colour": colour_a, "shape": None}, {"colour": colour_b, "shape": None}
        else:
            (colour_a, shape_a), (colour_b, shape_b) = _pair(rng, heldout=False)
            first = {"colour": colour_a, "shape": shape_a}
            second = {"colour": colour_b, "shape": shape_b}
    # The two groups never overlap (different shapes, colours or pairs), so their counts are independent.
    count_first, count_second = rng.sample(range(5), 2)
    neither = [c for c in pool if not _matches(first, c) and not _matches(second, c)]
    combinations = (
        [rng.choice([c for c in pool if _matches(first, c)]) for _ in range(count_first)]
        + [rng.choice([c for c in pool if _matches(second, c)]) for _ in range(count_second)]
        + [rng.choice(neither) for _ in range(rng.randint(0, MAX_OBJECTS - count_first - count_second))]
    )
    objects = _place(rng, combinations)
    question = f"are there more {_noun(first, plural=True)} than {_noun(second, plural=True)}?"
    answer = "yes" if count_first > count_second else "no"
    return _generated(rng, image_size, objects, question, answer, _involved(first, second), first=first, second=second)


def two_hop(rng: random.Random, image_size: int, heldout: bool) -> Generated:
    """what colour is the object left of the red square? Exactly one object stands in that relation."""
    pool = ALL_COMBINATIONS if heldout else SEEN_COMBINATIONS
    relation = rng.choice(RELATIONS)
    asked = rng.choice(ATTRIBUTES)
    anchor_pair, target_pair = _pair(rng, heldout)
    anchor_cell = rng.choice([a for a in CELLS if any(relation_holds(relation, c, a) for c in CELLS)])
    region = [c for c in CELLS if relation_holds(relation, c, anchor_cell)]
    outside = [c for c in CELLS if c != anchor_cell and c not in region]
    other_cells = rng.sample(outside, rng.randint(0, min(4, len(outside))))
    # Others avoid the anchor's pair so "the red square" names one object.
    others = [c for c in pool if c != anchor_pair]
    combinations = [anchor_pair, target_pair] + [rng.choice(others) for _ in other_cells]
    objects = _place(rng, combinations, [anchor_cell, rng.choice(region), *other_cells])
    anchor, target = objects[0], objects[1]
    question = f"what {asked} is the object {relation} the {anchor.colour} {anchor.shape}?"
    answer = getattr(target, asked)
    details = {"relation": relation, "attribute": asked, "anchor": anchor.to_meta(), "target": target.to_meta()}
    return _generated(rng, image_size, objects, question, answer, [anchor_pair, target_pair], **details)


FAMILIES = (
    Family("shapes_exist", 1, partial(exist, heldout=False), partial(exist, heldout=True)),
    Family("shapes_attribute", 1, partial(attribute, heldout=False), partial(attribute, heldout=True)),
    Family("shapes_count", 2, partial(count, heldout=False), partial(count, heldout=True)),
    Family("shapes_spatial", 2, partial(spatial, heldout=False), partial(spatial, heldout=True)),
    Family("shapes_compare", 2, partial(compare, heldout=False), partial(compare, heldout=True)),
    Family("shapes_two_hop", 3, partial(two_hop, heldout=False), partial(two_hop, heldout=True)),
)
