"""Rendered text: read one word or number, or add up a short list of amounts."""

from __future__ import annotations

import random

from masters.data.family import Family, Generated
from masters.data.render import GLYPH_HEIGHT, dark_colour, draw_text, light_background, text_width

WORDS = tuple("cat dog sun tree fish bird book cup key hat ship moon door lamp ball star".split())
ITEMS = ("tea", "pen", "jam", "egg", "box", "map", "ink", "bun")
MAX_NUMBER = 99
MAX_AMOUNT = 19
MAX_LINES = 4

VOCABULARY = (*WORDS, *ITEMS, "what", "word", "number", "is", "written", "the", "sum", "of", "numbers")


def read(rng: random.Random, image_size: int) -> Generated:
    """what word is written? / what number is written? -> the word or 0..99, drawn at twice the base scale."""
    kind = rng.choice(("word", "number"))
    text = rng.choice(WORDS) if kind == "word" else str(rng.randint(0, MAX_NUMBER))
    scale = 2 * max(1, image_size // 64)
    image = light_background(rng, image_size)
    x = rng.randint(2, image_size - 2 - text_width(text, scale))
    y = rng.randint(2, image_size - 2 - GLYPH_HEIGHT * scale)
    draw_text(image, (x, y), text, dark_colour(rng), scale)
    return Generated(f"what {kind} is written?", text, image, {"kind": kind, "text": text})


def total(rng: random.Random, image_size: int) -> Generated:
    """Lines like "tea 4"; what is the sum of the numbers? -> their sum."""
    items = rng.sample(ITEMS, rng.randint(2, MAX_LINES))
    amounts = [rng.randint(1, MAX_AMOUNT) for _ in items]
    lines = [f"{item} {amount}" for item, amount in zip(items, amounts, strict=True)]
    scale = max(1, image_size // 64)
    line_height = (GLYPH_HEIGHT + 1) * scale
    image = light_background(rng, image_size)
    ink = dark_colour(rng)
    x = rng.randint(2, image_size - 2 - max(text_width(line, scale) for line in lines))
    y = rng.randint(2, image_size - 2 - line_height * len(lines))
    for line in lines:
        draw_text(image, (x, y), line, ink, scale)
        y += line_height
    meta = {"lines": lines, "items": items, "amounts": amounts}
    return Generated("what is the sum of the numbers?", str(sum(amounts)), image, meta)


FAMILIES = (
    Family("text_read", 1, read),
    Family("text_sum", 3, total),
)
