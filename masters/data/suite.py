"""The generated VQA suite: deterministic samples from (family, split, seed, index).

Each sample draws from its own RNG, seeded by a hash of those four values, so a sample's bytes do
not depend on which other samples were generated or in what order, and each split (and seed) is
its own stream.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from masters.data import captions, charts, shapes, text
from masters.data.captions import reference_response
from masters.data.family import Family

SUITE_VERSION = "2"  # 2: reference responses (a rationale, then the answer)
SPLITS = ("train", "val", "test", "heldout")
MIN_IMAGE_SIZE = 56  # the four-line sums and the double-size words need this much room

_FAMILIES: dict[str, Family] = {f.name: f for f in (*shapes.FAMILIES, *charts.FAMILIES, *text.FAMILIES)}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
HELDOUT_FAMILIES: tuple[str, ...] = tuple(name for name, f in _FAMILIES.items() if f.generate_heldout is not None)
HELDOUT_COMBINATIONS = shapes.HELDOUT_COMBINATIONS
# Every word a question, answer or reference response can contain (numbers are 0..99), for the shared tokenizer.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        (*shapes.VOCABULARY, *charts.VOCABULARY, *text.VOCABULARY, *captions.VOCABULARY, *map(str, range(100)))
    )
)


@dataclass(frozen=True)
class VQASample:
    """One question about one image. `id` is "<family>/<split>/<seed>/<index>"; `meta` is what the answer was
    computed from (JSON-serialisable). `answer` is what a response is judged against; `response` is the
    reference response a model is trained on: for the suite a rationale and then `answer: <answer>`
    (`masters.data.captions.reference_response`), for a dataset without one the answer itself."""

    id: str
    family: str
    split: str
    question: str
    answer: str
    image: Image.Image
    difficulty: int
    meta: dict[str, Any]
    response: str = ""

    def __post_init__(self) -> None:
        if not self.response:
            object.__setattr__(self, "response", self.answer)


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")


def _check_family(family: str, split: str) -> Family:
    if family not in _FAMILIES:
        raise ValueError(f"family {family!r} is unknown; choose one of {', '.join(FAMILIES)}")
    if split == "heldout" and family not in HELDOUT_FAMILIES:
        raise ValueError(
            f"family {family!r} has no held-out questions (they need shape scenes); "
            f"for split 'heldout' choose one of {', '.join(HELDOUT_FAMILIES)}"
        )
    return _FAMILIES[family]


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an integer >= {MIN_IMAGE_SIZE} (smaller images cannot fit legible text), "
            f"got {image_size!r}"
        )


def sample_id(family: str, split: str, seed: int, index: int) -> str:
    return f"{family}/{split}/{seed}/{index}"


def make_sample(family: str, split: str, seed: int, index: int, image_size: int = 64) -> VQASample:
    """The sample `index` of `family` in `split` for `seed`; the same arguments always give the same bytes."""
    _check_split(split)
    spec = _check_family(family, split)
    _check_int("seed", seed)
    _check_int("index", index, minimum=0)
    _check_image_size(image_size)
    key = sample_id(family, split, seed, index)
    # A per-sample RNG (never the global one): order independence and a separate stream per split and seed.
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big"))
    generate = spec.generate_heldout if split == "heldout" else spec.generate
    out = generate(rng, image_size)
    response = reference_response(family, out.meta, out.answer)
    return VQASample(key, family, split, out.question, out.answer, out.image, spec.difficulty, out.meta, response)


def _split_families(split: str, families: Sequence[str] | None) -> Sequence[str]:
    if families is None:
        return HELDOUT_FAMILIES if split == "heldout" else FAMILIES
    if isinstance(families, str) or not families or len(set(families)) != len(families):
        raise ValueError(
            f"families must be a non-empty list of distinct names from {', '.join(FAMILIES)}, got {families!r}"
        )
    for family in families:
        _check_family(family, split)
    return families


def make_split(
    split: str, size: int, seed: int = 0, families: Sequence[str] | None = None, image_size: int = 64, start: int = 0
) -> list[VQASample]:
    """`size` samples from position `start`, with families interleaved round-robin, so every prefix is
    balanced and stable and any slice can be made on its own (the suite is written in slices).

    The default families are all of them, or those with held-out questions (the shape families) for `heldout`.
    """
    _check_split(split)
    _check_int("size", size, minimum=0)
    _check_int("start", start, minimum=0)
    _check_int("seed", seed)
    _check_image_size(image_size)
    families = _split_families(split, families)
    return [
        make_sample(families[i % len(families)], split, seed, i // len(families), image_size)
        for i in range(start, start + size)
    ]


def split_ids(split: str, size: int, seed: int = 0, families: Sequence[str] | None = None) -> list[str]:
    """The ids of `make_split(split, size, seed, families)`, without making the samples."""
    _check_split(split)
    families = _split_families(split, families)
    return [sample_id(families[i % len(families)], split, seed, i // len(families)) for i in range(size)]


def text_corpus(seed: int = 0, size: int = 2000) -> list[str]:
    """Questions and reference responses of `size` train samples, then one line with every suite word (for rare answers)."""
    corpus = []
    for sample in make_split("train", size, seed):
        corpus += [sample.question, sample.response]
    corpus.append(" ".join(VOCABULARY))
    return corpus
