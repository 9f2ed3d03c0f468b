"""What the benchmarks that measure a process share: the environment it runs in, and its memory as
Linux reports it in /proc/self/status.

A benchmark runs as a script, with this folder first on `sys.path`, so `import harness` finds this file.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_offline_on_one_thread() -> None:
    """Call before torch is imported. No model hub, and one thread per process (spawned processes and
    Ray workers inherit it), so the figures are per core; a variable the caller set is kept."""
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(name, value)


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last `reset_peak`), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Restart the peak (VmHWM) from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
