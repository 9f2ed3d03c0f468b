"""The generated VQA suite: task families, seeded splits, a held-out split and exporters."""

from masters.data.captions import CAPTION_QUESTION, describe
from masters.data.export import read_parquet, write_hf_dataset, write_lmms_eval, write_parquet, write_vlmevalkit_tsv
from masters.data.suite import (
    FAMILIES,
    HELDOUT_COMBINATIONS,
    HELDOUT_FAMILIES,
    MIN_IMAGE_SIZE,
    SPLITS,
    SUITE_VERSION,
    VOCABULARY,
    VQASample,
    make_sample,
    make_split,
    text_corpus,
)
from masters.data.source import load_split

__all__ = [
    "CAPTION_QUESTION",
    "FAMILIES",
    "HELDOUT_COMBINATIONS",
    "HELDOUT_FAMILIES",
    "MIN_IMAGE_SIZE",
    "SPLITS",
    "SUITE_VERSION",
    "VOCABULARY",
    "VQASample",
    "describe",
    "make_sample",
    "load_split",
    "make_split",
    "read_parquet",
    "text_corpus",
    "write_hf_dataset",
    "write_lmms_eval",
    "write_parquet",
    "write_vlmevalkit_tsv",
]
