"""Descriptions of the suite's images, built from each sample's `meta`: the zoo's alignment data.

A VLM learns to read its image tokens much faster from a description of everything in the image than
from one short answer per image, so the zoo trains on both (as LLaVA pairs caption data with its
instruction data). The zoo trains its tokenizer on descriptions too.
"""

from __future__ import annotations

from masters.data.suite import VQASample

CAPTION_QUESTION = "describe the image."
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
