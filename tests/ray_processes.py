"""Processes of a test's own Ray instance: environments, free ports, finding and stopping what is left.

A test that starts Ray in a subprocess gives it a fresh RAY_TMPDIR. That variable doubles as a marker:
every process of that instance inherits it, so leftovers (and only ours) are found through
/proc/<pid>/environ.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # `ray` and `python` of this environment


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_environment(ray_tmpdir: Path) -> dict[str, str]:
    """The subprocesses' environment: offline, quiet, this venv first, Ray files under `ray_tmpdir`.

    RAY_TMPDIR doubles as a marker: every process of that Ray instance inherits it, so leftovers
    can be found (and only ours) through /proc/<pid>/environ.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_TMPDIR=str(ray_tmpdir),
    )
    return env


def processes_with_env(name: str, value: str) -> list[int]:
    marker = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def stop_process_group(process: subprocess.Popen, ray_tmpdir: Path, grace_s: float = 20.0) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace_s`, then any stray process of that Ray instance."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kill_strays(ray_tmpdir)


def kill_strays(ray_tmpdir: Path, grace_s: float = 10.0) -> list[str]:
    """Wait up to `grace_s` for the processes of the Ray instance under `ray_tmpdir` to exit, then SIGKILL
    the rest; returns the names of those that had to be killed."""
    marker = str(ray_tmpdir)
    deadline = time.monotonic() + grace_s
    while (alive := processes_with_env("RAY_TMPDIR", marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = []
    for pid in alive:
        with contextlib.suppress(OSError):
            killed.append(Path(f"/proc/{pid}/comm").read_text().strip())
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (alive := processes_with_env("RAY_TMPDIR", marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"Ray processes {alive} survived SIGKILL"
    return killed
