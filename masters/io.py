"""What crosses the process's boundary, one way each: files written atomically (a reader sees either the
old artifact or the complete new one, never half of it), the digest that names an artifact by what
produced it, text tables for the console, and API keys read from the environment variable a setting names.

Standard library only: the pipeline's Ray workers import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: object) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success it replaces `path` whole, on error it is removed.

    A crash mid-write leaves only a `.<name>.*.tmp` sibling, which no reader ever opens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            # Move the old one aside first so the final rename is a single step.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_digest(payload: object) -> str:
    """16 hex digits of the SHA-256 of `payload` as JSON with sorted keys: what names a cache entry or
    a saved state by what produced it, so any change to the payload gives a new name."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def aligned_table(rows: Sequence[Sequence[str]], right_aligned: Collection[int] = ()) -> str:
    """`rows` of cells as columns two spaces apart, left-aligned but for the `right_aligned` column
    indices (numbers), without trailing spaces."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if c in right_aligned else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    )


def api_key_from_env(variable: str | None, setting: str) -> str | None:
    """The API key in the environment variable `variable`, named by the setting `setting` (e.g.
    `rewards.judge.api_key_env`); None when `variable` is None (no key). An unset or empty variable is
    an error, raised before any request."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ValueError(
            f"{setting} names {variable!r}, which is not set in the environment; "
            f"export it (on every node) or unset {setting}"
        )
    return key
