"""Where a run's questions come from: the generated suite, or Parquet files of the same columns."""

from __future__ import annotations

from pathlib import Path

from masters.config import DataConfig
from masters.data.export import read_parquet
from masters.data.suite import VQASample, make_split


def load_split(data: DataConfig, split: str, size: int) -> list[VQASample]:
    """The first `size` samples of `split`.

    `data.dataset` is `suite` (generated, deterministic from `data.seed`), a directory holding
    `<split>.parquet`, or one Parquet file whose `split` column is filtered.
    """
    if data.dataset == "suite":
        return make_split(split, size, seed=data.seed, families=data.families)
    path = Path(data.dataset)
    if path.is_dir():
        path = path / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(
            f"data.dataset {data.dataset!r}: no {path.name} there; give `suite`, a directory with "
            "<split>.parquet files, or a Parquet file written by masters.data.write_parquet"
        )
    samples = [s for s in read_parquet(path) if s.split == split and (data.families is None or s.family in data.families)]
    if len(samples) < size:
        raise ValueError(f"data.dataset {str(path)!r} has {len(samples)} {split!r} samples; the config asks for {size}")
    return samples[:size]
