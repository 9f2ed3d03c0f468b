"""Where a run's questions come from: the generated suite, or Parquet files of the same columns.

The train split is never loaded whole. `QuestionIndex.open` reads only the `id` column (and `split`
and `family` when they filter) and remembers where each question lives (row group and row); the
pipeline's Ray Data tasks then read a stage's questions row group by row group (`read_questions`).
The generated suite takes the same path: its split is written to Parquet once, slice by slice, under
`<storage_path>/datasets/` (`split_file`). Evaluation splits are small and are loaded as samples
(`load_split`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from masters.config import DataConfig
from masters.data.export import COLUMNS, ROWS_PER_ROW_GROUP, parquet_table, read_parquet
from masters.data.suite import SUITE_VERSION, VQASample, make_split, split_ids
from masters.io import atomic_directory, atomic_write_json, json_digest

# What a stage row needs of a question; `response` (the reference response) is optional in a dataset.
QUESTION_COLUMNS = ("id", "family", "question", "answer", "image")


def load_split(data: DataConfig, split: str, size: int) -> list[VQASample]:
    """The first `size` samples of `split`, decoded (for evaluation splits; training reads `QuestionIndex`).

    `data.dataset` is `suite` (generated, deterministic from `data.seed`), a directory holding
    `<split>.parquet`, or one Parquet file whose `split` column is filtered.
    """
    if data.dataset == "suite":
        return make_split(split, size, seed=data.seed, families=data.families)
    path = dataset_file(data, split)
    samples = [s for s in read_parquet(path) if s.split == split and (data.families is None or s.family in data.families)]
    if len(samples) < size:
        raise ValueError(f"data.dataset {str(path)!r} has {len(samples)} {split!r} samples; the config asks for {size}")
    return samples[:size]


def question_ids(data: DataConfig, split: str, size: int) -> list[str]:
    """The ids of the first `size` questions of `split`, writing nothing (for plans and dry runs)."""
    if data.dataset == "suite":
        return split_ids(split, size, seed=data.seed, families=data.families)
    return QuestionIndex.read(dataset_file(data, split), data, split, size).ids


def dataset_file(data: DataConfig, split: str) -> Path:
    """The Parquet file of a user dataset that holds `split`."""
    path = Path(data.dataset)
    if path.is_dir():
        path = path / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(
            f"data.dataset {data.dataset!r}: no {path.name} there; give `suite`, a directory with "
            "<split>.parquet files, or a Parquet file written by masters.data.write_parquet"
        )
    return path


def split_file(data: DataConfig, split: str, size: int, storage_path: str | Path) -> Path:
    """The Parquet file to read `split` from: the dataset's, or the suite's first `size` samples, written
    on first use to `<storage_path>/datasets/suite-<key>/<split>.parquet` (with a manifest, atomically)."""
    if data.dataset != "suite":
        return dataset_file(data, split)
    identity = {"suite_version": SUITE_VERSION, "seed": data.seed, "families": data.families, "split": split, "size": size}
    key = json_digest(identity)
    directory = Path(storage_path) / "datasets" / f"suite-{key}"
    path = directory / f"{split}.parquet"
    if (directory / "manifest.json").is_file():
        return path
    with atomic_directory(directory) as staging:
        writer = None
        for start in range(0, size, ROWS_PER_ROW_GROUP):  # one row group at a time: memory stays flat in `size`
            count = min(ROWS_PER_ROW_GROUP, size - start)
            table = parquet_table(make_split(split, count, seed=data.seed, families=data.families, start=start))
            writer = writer or pq.ParquetWriter(staging / path.name, table.schema)
            writer.write_table(table, row_group_size=ROWS_PER_ROW_GROUP)
        writer.close()
        atomic_write_json(staging / "manifest.json", {**identity, "files": [path.name]})
    return path


@dataclass(frozen=True)
class QuestionIndex:
    """The first `len(ids)` questions of one split of one Parquet file, by position: id, row group, row.

    Holds ids and two int32 arrays, never images or text: what the driver keeps of a 1.5M-question split.
    """

    path: str
    ids: list[str]
    row_groups: np.ndarray  # [questions] int32
    rows: np.ndarray  # [questions] int32: the row within its row group

    @classmethod
    def open(cls, data: DataConfig, split: str, size: int, storage_path: str | Path) -> QuestionIndex:
        """Index the first `size` questions of `split` (of `data.families`, if set); the suite is written first."""
        return cls.read(split_file(data, split, size, storage_path), data, split, size)

    @classmethod
    def read(cls, path: Path, data: DataConfig, split: str, size: int) -> QuestionIndex:
        parquet = pq.ParquetFile(path)
        missing = [c for c in ("split", *QUESTION_COLUMNS) if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"data.dataset {str(path)!r} lacks the columns {missing}; it needs {list(COLUMNS)}")
        ids: list[str] = []
        row_groups, rows = [], []
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["id", "split", "family"])
            keep = pc.equal(table.column("split"), split)
            if data.families is not None:
                keep = pc.and_(keep, pc.is_in(table.column("family"), pa.array(data.families)))
            (positions,) = np.nonzero(keep.to_numpy(zero_copy_only=False))
            positions = positions[: size - len(ids)]
            ids += table.column("id").take(positions).to_pylist()
            row_groups.append(np.full(len(positions), group, np.int32))
            rows.append(positions.astype(np.int32))
            if len(ids) == size:
                break
        if len(ids) < size:
            raise ValueError(f"data.dataset {str(path)!r} has {len(ids)} {split!r} questions; the config asks for {size}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"data.dataset {str(path)!r}: question ids repeat in {split!r}; every id must be unique")
        return cls(str(path), ids, np.concatenate(row_groups), np.concatenate(rows))

    def __len__(self) -> int:
        return len(self.ids)

    def row_group_reads(self, indices: Sequence[int]) -> list[dict]:
        """The questions at `indices`, grouped by row group in file order: one read each
        (`row_group`, `rows` within it, their `question_ids`)."""
        order = np.asarray(indices, np.int64)
        order = order[np.lexsort((self.rows[order], self.row_groups[order]))]
        starts = np.flatnonzero(np.diff(self.row_groups[order])) + 1
        return [
            {
                "row_group": int(self.row_groups[members[0]]),
                "rows": self.rows[members].tolist(),
                "question_ids": [self.ids[i] for i in members],
            }
            for members in np.split(order, starts)
            if len(members)
        ]


@functools.lru_cache(maxsize=2)
def _opened(path: str, modified_ns: int) -> pq.ParquetFile:
    # Kept open between reads: a 1.5M-question file's footer (its row groups' metadata) is megabytes to
    # parse, once per worker rather than once per row group read. A replaced file is opened anew.
    return pq.ParquetFile(path)


def read_questions(path: str, row_group: int, rows: Sequence[int], question_ids: Sequence[str]) -> pa.Table:
    """`rows` of one row group: the question columns plus `response` (the answer where the file has none).
    Raises if the ids are not the indexed ones (the file changed under the run)."""
    parquet = _opened(path, os.stat(path).st_mtime_ns)
    columns = list(QUESTION_COLUMNS) + (["response"] if "response" in parquet.schema_arrow.names else [])
    table = parquet.read_row_group(row_group, columns=columns).take(pa.array(rows, pa.int32()))
    if table.column("id").to_pylist() != list(question_ids):
        raise ValueError(
            f"data.dataset {path!r} changed since the run indexed it (row group {row_group} holds other question "
            "ids); start a new run (--set name=...) or restore the file"
        )
    if "response" not in columns:
        table = table.append_column("response", table.column("answer"))
    return table
