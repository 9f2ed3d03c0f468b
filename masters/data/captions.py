"""Text built from each sample's `meta`: descriptions (the zoo's alignment data) and rationales.

A VLM learns to read its image tokens much faster from a description of everything in the image than
from one short answer per image, so the zoo trains on both (as LLaVA pairs caption data with its
instruction data). The zoo trains its tokenizer on descriptions too.

A *rationale* is what the image shows that the question needs ("red circle top left, red circle bottom
middle" before "how many red circles?" is answered). The suite's reference response is the rationale and
then `answer: <answer>` (`reference_response`): responses then differ by what they claim to see, so a
teacher's divergence from them depends on their content, and the judge scores the final answer
(`masters.judging.final_answer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masters.data.suite import VQASample

CAPTION_QUESTION = "describe the image."
# Words of descriptions and rationales that no question or answer uses (the tokenizer's corpus lists them).
VOCABULARY = ("top", "middle", "bottom", "bar", "line", "chart", "none", "answer")
ROW_WORDS = ("top", "middle", "bottom")
COLUMN_WORDS = ("left", "middle", "right")


def describe(sample: VQASample) -> str:
    """All the image holds, in reading order: every shape with size, colour and cell; every chart value; the text."""
    meta = sample.meta
    if "objects" in meta:  # shapes: "large green diamond top middle, small red diamond top right, ..."
        objects = sorted(meta["objects"], key=lambda o: (o["row"], o["col"]))
        return ", ".join(
            f"{o['size']} {o['colour']} {o['shape']} {ROW_WORDS[o['row']]} {COLUMN_WORDS[o['col']]}" for o in objects
        )
    if "values" in meta:  # charts: "bar chart a 1, b 6, c 2, d 6"
        return f"{meta['kind']} chart " + ", ".join(f"{label} {value}" for label, value in zip(meta["labels"], meta["values"]))
    if "lines" in meta:  # a list of amounts: "bun 2, tea 10"
        return ", ".join(meta["lines"])
    if "text" in meta:  # a word or a number: "word sun", "number 22"
        return f"{meta['kind']} {meta['text']}"
    raise ValueError(f"sample {sample.id} ({sample.family}) has no meta a description can be built from")


def _object(o: dict[str, Any]) -> str:
    return f"{o['size']} {o['colour']} {o['shape']} {ROW_WORDS[o['row']]} {COLUMN_WORDS[o['col']]}"


def _matches(query: dict[str, str | None], o: dict[str, Any]) -> bool:
    return query["colour"] in (None, o["colour"]) and query["shape"] in (None, o["shape"])


def _plural(query: dict[str, str | None]) -> str:
    noun = f"{query['shape']}s" if query["shape"] else "objects"
    return f"{query['colour']} {noun}" if query["colour"] else noun


def rationale(family: str, meta: dict[str, Any]) -> str:
    """What the image shows that the question needs, in words the answer follows from."""
    objects = meta.get("objects", [])
    if family in ("shapes_exist", "shapes_count"):  # every object the question asks about, or "none"
        return ", ".join(_object(o) for o in objects if _matches(meta["query"], o)) or "none"
    if family == "shapes_attribute":
        return _object(meta["target"])
    if family == "shapes_spatial":
        return f"{_object(meta['subject'])}, {_object(meta['anchor'])}"
    if family == "shapes_compare":
        counts = [sum(_matches(meta[side], o) for o in objects) for side in ("first", "second")]
        return f"{_plural(meta['first'])} {counts[0]}, {_plural(meta['second'])} {counts[1]}"
    if family == "shapes_two_hop":
        return f"{_object(meta['anchor'])}, {_object(meta['target'])}"
    if "values" in meta:  # charts: every value
        return f"{meta['kind']} chart " + ", ".join(f"{label} {value}" for label, value in zip(meta["labels"], meta["values"]))
    if "lines" in meta:  # the amounts
        return ", ".join(meta["lines"])
    if "text" in meta:
        return f"{meta['kind']} {meta['text']}"
    raise ValueError(f"family {family!r} has no meta a rationale can be built from")


def reference_response(family: str, meta: dict[str, Any], answer: str) -> str:
    """The suite's reference response: the rationale, then the answer after `answer:`."""
    return f"{rationale(family, meta)}. answer: {answer}"
