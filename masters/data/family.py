"""The contract between the suite and its task families."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Generated:
    """What one family produces for one sample; the suite adds id, split and difficulty."""

    question: str
    answer: str
    image: Image.Image
    meta: dict[str, Any]


Generator = Callable[[random.Random, int], Generated]
"""(per-sample RNG, image_size) -> Generated. Must draw all randomness from the given RNG."""


@dataclass(frozen=True)
class Family:
    name: str
    difficulty: int
    generate: Generator
    # Families whose scenes have (colour, shape) pairs can build held-out questions; the others cannot.
    generate_heldout: Generator | None = None
