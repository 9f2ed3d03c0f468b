"""Writing the suite to Parquet, a Hugging Face dataset directory, an lmms-eval task and a VLMEvalKit TSV.

Every write is atomic: files go to a temporary name in the target's directory and are moved into
place with os.replace; directories are built next to the target and swapped in, with a
`manifest.json` describing what they hold.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from masters.data.suite import SUITE_VERSION, VQASample

if TYPE_CHECKING:
    import datasets

MANIFEST = "manifest.json"
COLUMNS = ("id", "family", "split", "question", "answer", "difficulty", "image", "meta")
VERSION_KEY = b"masters_suite_version"
# Questions per Parquet row group: what a reader of a few questions reads at least.
ROWS_PER_ROW_GROUP = 64
LMMS_EVAL_PROMPT = "\nAnswer the question using a single word or number."


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as png:
        image = png.convert("RGB")  # a plain in-memory Image, detached from the file object
    image.info = {}  # generated images carry no PNG chunks; keep read-back images equal to them
    return image


def _check_samples(samples: Sequence[VQASample]) -> None:
    if not samples:
        raise ValueError("samples is empty; pass the list returned by make_split (size >= 1)")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name rather than mkstemp, whose 0600 mode would outlive the rename.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def _atomic_directory(directory: str | os.PathLike, kind: str, samples: Sequence[VQASample]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it gets a manifest and replaces `directory`."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST).is_file():
        # Never delete something this module did not write.
        raise ValueError(
            f"directory {str(directory)!r} exists and is not a suite export (no {MANIFEST}); "
            "pass a new directory or remove it first"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        yield staging
        manifest = {
            "format": kind,
            "suite_version": SUITE_VERSION,
            "num_samples": len(samples),
            "splits": dict(Counter(s.split for s in samples)),
            "families": dict(Counter(s.family for s in samples)),
            "files": sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            # os.replace cannot overwrite a non-empty directory: move the old export aside first.
            retired = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.old")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- Parquet


def parquet_table(samples: Sequence[VQASample]) -> pa.Table:
    """One row per sample; the image as PNG bytes, meta as a JSON string, the suite version in the schema."""
    return pa.table(
        {
            "id": pa.array([s.id for s in samples], pa.string()),
            "family": pa.array([s.family for s in samples], pa.string()),
            "split": pa.array([s.split for s in samples], pa.string()),
            "question": pa.array([s.question for s in samples], pa.string()),
            "answer": pa.array([s.answer for s in samples], pa.string()),
            "response": pa.array([s.response for s in samples], pa.string()),
            "difficulty": pa.array([s.difficulty for s in samples], pa.int8()),
            "image": pa.array([png_bytes(s.image) for s in samples], pa.binary()),
            "meta": pa.array([json.dumps(s.meta, sort_keys=True) for s in samples], pa.string()),
        }
    ).replace_schema_metadata({VERSION_KEY: SUITE_VERSION.encode()})


def write_parquet(samples: Sequence[VQASample], path: str | os.PathLike) -> Path:
    """The samples as one Parquet file (`parquet_table`), in row groups of `ROWS_PER_ROW_GROUP`."""
    _check_samples(samples)
    with atomic_file(path) as temporary:
        pq.write_table(parquet_table(samples), temporary, row_group_size=ROWS_PER_ROW_GROUP)
    return Path(path)


def read_parquet(path: str | os.PathLike) -> list[VQASample]:
    """Samples written by write_parquet (or any Parquet file with the same columns)."""
    if not Path(path).is_file():
        raise ValueError(f"parquet file {str(path)!r} does not exist; write one with write_parquet or make_suite.py")
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"parquet file {str(path)!r} lacks the suite columns {missing}; it needs {list(COLUMNS)}")
    return [
        VQASample(
            id=row["id"],
            family=row["family"],
            split=row["split"],
            question=row["question"],
            answer=row["answer"],
            image=decode_png(row["image"]),
            difficulty=int(row["difficulty"]),
            meta=json.loads(row["meta"]),
            response=row.get("response") or row["answer"],
        )
        for row in table.select(list(COLUMNS) + (["response"] if "response" in table.column_names else [])).to_pylist()
    ]


# --------------------------------------------------------------------------- Hugging Face datasets


def _hf_dataset(samples: Sequence[VQASample]) -> datasets.Dataset:
    import datasets  # imported here: it is slow to import and only the exporters need it

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "family": datasets.Value("string"),
            "split": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "difficulty": datasets.Value("int8"),
            "image": datasets.Image(),
            "meta": datasets.Value("string"),
        }
    )
    columns = {
        "id": [s.id for s in samples],
        "family": [s.family for s in samples],
        "split": [s.split for s in samples],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "difficulty": [s.difficulty for s in samples],
        "image": [{"bytes": png_bytes(s.image), "path": None} for s in samples],
        "meta": [json.dumps(s.meta, sort_keys=True) for s in samples],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def write_hf_dataset(samples: Sequence[VQASample], directory: str | os.PathLike) -> Path:
    """A `datasets.Dataset` saved with save_to_disk, for `datasets.load_from_disk`; `image` is `datasets.Image`."""
    _check_samples(samples)
    with _atomic_directory(directory, "hf_dataset", samples) as staging:
        _hf_dataset(samples).save_to_disk(str(staging))
    return Path(directory)


# --------------------------------------------------------------------------- lmms-eval


def lmms_eval_task_name(samples: Sequence[VQASample]) -> str:
    splits = {s.split for s in samples}
    return f"masters_suite_{splits.pop()}" if len(splits) == 1 else "masters_suite"


def write_lmms_eval(samples: Sequence[VQASample], directory: str | os.PathLike) -> Path:
    """An lmms-eval custom task: `<task>.yaml` plus `data.parquet`; run with `--include_path <directory>`.

    The YAML names the data file by absolute path (lmms-eval resolves `data_files` from its working
    directory), so re-export after moving the directory. Returns the YAML path.
    """
    _check_samples(samples)
    directory = Path(directory).resolve()
    task = lmms_eval_task_name(samples)
    config = {
        "task": task,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(directory / "data.parquet")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "image",
        "doc_to_text": "{{question}}" + LMMS_EVAL_PROMPT,
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n"]},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
        "metadata": {"version": SUITE_VERSION},
    }
    with _atomic_directory(directory, "lmms_eval", samples) as staging:
        # Written through `datasets` so the Parquet schema records `image` as datasets.Image and
        # lmms-eval's load_dataset("parquet") hands PIL images to doc_to_visual.
        _hf_dataset(samples).to_parquet(str(staging / "data.parquet"))
        (staging / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory / f"{task}.yaml"


# --------------------------------------------------------------------------- VLMEvalKit


def write_vlmevalkit_tsv(samples: Sequence[VQASample], path: str | os.PathLike) -> Path:
    """VLMEvalKit's TSV: index, base64 PNG image, question, answer, category (the family), then extras.

    Put it at `$LMUData/<name>.tsv` to evaluate it as a custom VQA dataset.
    """
    _check_samples(samples)
    with atomic_file(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["index", "image", "question", "answer", "category", "difficulty", "split", "id"])
            for index, s in enumerate(samples):
                image = base64.b64encode(png_bytes(s.image)).decode("ascii")
                writer.writerow([index, image, s.question, s.answer, s.family, s.difficulty, s.split, s.id])
    return Path(path)
