"""Stage directories on disk: Parquet parts + a manifest, written atomically, each question exactly once.

A directory is *complete* when its `manifest.json` exists, carries this code's schema version and
the expected config hash, and lists files that are all present with their recorded sizes. Anything
else (no manifest, another hash, a missing part, a leftover temp sibling from a crash) is partial
and gets removed and redone from the start. Writers fill a temp directory next to the target and
rename it into place at the end (`masters.io.atomic_directory`), so readers never see half a stage.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from masters.io import atomic_directory, atomic_write_json
from masters.records import ROWS_PER_ROW_GROUP, SCHEMA_VERSION, check_schema

MANIFEST = "manifest.json"
# ~8 responses x 16 tokens x 64 top-k entries x 8 bytes ≈ 65 KB a row: parts of ~16 MB.
ROWS_PER_FILE = 256


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(directory: str | Path, config_hash: str) -> bool:
    """True when `directory` holds a finished write of this config by this schema version."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("config_hash") != config_hash:
        return False
    for part in manifest.get("files", []):
        path = directory / part["name"]
        if not path.is_file() or path.stat().st_size != part["bytes"]:
            return False
    return True


def remove_partial(directory: str | Path) -> list[Path]:
    """Delete a partial `directory` and the temp siblings crashed writes left next to it; returns what was removed."""
    directory = Path(directory)
    removed = sorted(directory.parent.glob(f".{directory.name}.*.tmp")) + sorted(
        directory.parent.glob(f".{directory.name}.*.old")
    )
    if directory.exists():
        removed.append(directory)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def read_parts(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of a complete directory, in part order; raises if it is not complete."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(
            f"{str(directory)!r} has no {MANIFEST}: the stage was never finished; rerun the pipeline to produce it"
        )
    tables = [pq.read_table(directory / part["name"], columns=columns) for part in manifest["files"]]
    table = pa.concat_tables(tables)
    if columns is None and manifest["kind"] == "stage":
        check_schema(table.schema)
    return table


class PartWriter:
    """Writes row batches into Parquet parts inside a temp directory, checking each question id occurs once.

    Use as a context manager; `finish()` writes the manifest, and leaving the block renames the temp
    directory onto `directory`. An exception (or a missing `finish()`) removes the temp directory.
    """

    def __init__(self, directory: str | Path, schema: pa.Schema, kind: str):
        self.directory = Path(directory)
        self.schema = schema
        self.kind = kind
        self.question_ids: set[str] = set()
        self._files: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._started = time.monotonic()
        self._finished = False

    def __enter__(self) -> PartWriter:
        self._atomic = atomic_directory(self.directory)
        self._tmp = self._atomic.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None and not self._finished:
            exc = RuntimeError(f"PartWriter for {str(self.directory)!r} closed without finish(); nothing was written")
            self._atomic.__exit__(type(exc), exc, None)
            raise exc
        return self._atomic.__exit__(exc_type, exc, tb)

    def write(self, table: pa.Table) -> None:
        """Append rows (cast to the schema). Raises on a question id seen before in this directory."""
        table = table.select(self.schema.names).cast(self.schema)
        for question_id in table.column("question_id").to_pylist():
            if question_id in self.question_ids:
                raise RuntimeError(
                    f"question {question_id!r} reached the writer of {str(self.directory)!r} twice; "
                    "a retried task must not emit its rows again (nothing was written)"
                )
            self.question_ids.add(question_id)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROWS_PER_FILE:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        # An empty directory still gets one (empty) part, so readers always find the schema.
        if not self._pending_rows and not (final and not self._files):
            return
        name = f"part-{len(self._files):05d}.parquet"
        table = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        pq.write_table(table, self._tmp / name, row_group_size=ROWS_PER_ROW_GROUP)
        self._files.append({"name": name, "rows": table.num_rows, "bytes": (self._tmp / name).stat().st_size})
        self._pending, self._pending_rows = [], 0

    def finish(self, expected_ids: Iterable[str], missing_ok: Iterable[str] = (), **manifest: object) -> dict:
        """Check every expected question was written exactly once (bar `missing_ok`), then write the manifest."""
        self._flush(final=True)
        expected, excused = set(expected_ids), set(missing_ok)
        missing = expected - excused - self.question_ids
        unexpected = self.question_ids - expected
        if missing or unexpected:
            raise RuntimeError(
                f"{str(self.directory)!r}: {len(missing)} questions missing (e.g. {sorted(missing)[:3]}) and "
                f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}); nothing was written"
            )
        payload = {
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            **manifest,
            "files": self._files,
            "rows": sum(part["rows"] for part in self._files),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self._started, 3),
        }
        atomic_write_json(self._tmp / MANIFEST, payload)
        self._finished = True
        return payload
