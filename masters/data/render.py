"""Drawing helpers shared by the families: the bitmap font, scaled text and light backgrounds."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

# The bitmap font renders the same pixels everywhere (FreeType output can change between builds),
# which keeps image bytes reproducible across machines.
FONT = ImageFont.load_default_imagefont()
GLYPH_WIDTH = 6
GLYPH_HEIGHT = 11
# Ink of letters without descenders spans rows 2..8 of the 11-row glyph box.
INK_TOP, INK_BOTTOM = 2, 8

RGB = tuple[int, int, int]


def text_width(text: str, scale: int) -> int:
    return len(text) * GLYPH_WIDTH * scale


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill: RGB, scale: int = 1) -> None:
    """Draw `text` with its glyph box's top-left at `xy`, each font pixel as a `scale`x`scale` block."""
    if scale == 1:
        ImageDraw.Draw(image).text(xy, text, font=FONT, fill=fill)
        return
    mask = Image.new("L", (text_width(text, 1), GLYPH_HEIGHT))
    ImageDraw.Draw(mask).text((0, 0), text, font=FONT, fill=255)
    mask = mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)
    image.paste(fill, (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height), mask)


def light_background(rng: random.Random, image_size: int) -> Image.Image:
    """A near-white canvas with a slight random tint, so identical content rarely gives identical bytes."""
    colour = tuple(rng.randint(228, 255) for _ in range(3))
    return Image.new("RGB", (image_size, image_size), colour)


def dark_colour(rng: random.Random) -> RGB:
    return tuple(rng.randint(0, 70) for _ in range(3))
