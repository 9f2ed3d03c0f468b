"""`jobs/serve_teachers.py` as a process: it serves the micro model, and SIGTERM (what `docker stop`,
systemd, Kubernetes and `ray job stop` send) shuts Serve and Ray down as Ctrl-C does.

The job starts its own Ray instance with its files under a fresh RAY_TMPDIR. That variable doubles as
a marker: every process of that instance inherits it, so leftovers (and only ours) are found through
/proc/<pid>/environ.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray_processes import free_ports, processes_with_env, run_environment

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "serve_teachers.py"
STARTUP_TIMEOUT_S = 300  # Ray, Serve and three replicas loading the micro model on 2 busy cores
SHUTDOWN_TIMEOUT_S = 90  # serve.shutdown() + ray.shutdown(); ~10 s on 2 idle cores

pytestmark = [pytest.mark.slow, pytest.mark.timeout(STARTUP_TIMEOUT_S + SHUTDOWN_TIMEOUT_S + 120)]


def job_environment(ray_tmpdir: Path) -> dict[str, str]:
    """Offline and quiet; this checkout's code first (the venv's editable install may be another one)."""
    env = run_environment(ray_tmpdir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def process_names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            names.append(f"{pid}: {command[:120]}")
    return names


def wait_until_serving(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve_teachers.py exited with {process.returncode} before serving:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"serve_teachers.py did not answer {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_ends_the_service_and_every_ray_process(micro_model_dir, tmp_path, stop):
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-stop-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    marker = str(ray_tmpdir)
    (port,) = free_ports(1)
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {"teachers": [{"name": "teacher", "model": str(micro_model_dir)}], "student": str(micro_model_dir)},
                "mask": {"max_mask_ratio": 0.1, "mask_step": 0.1},
                "serve": {"port": port},
            }
        )
    )
    log = tmp_path / "serve_teachers.log"
    command = [sys.executable, str(JOB), "--config", str(config)]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=job_environment(ray_tmpdir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(process, f"http://127.0.0.1:{port}/health", log)
        assert len(processes_with_env("RAY_TMPDIR", marker)) > 3, "expected the job, Ray's daemons and the replicas"

        # To the job's process alone, as `docker stop` or `kill` would: the job must take Ray down itself.
        started = time.monotonic()
        process.send_signal(stop)
        try:
            returncode = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SHUTDOWN_TIMEOUT_S} s after {stop.name}:\n{log.read_text()[-4000:]}")
        stopped_s = time.monotonic() - started
        # ray.shutdown() has already waited for the processes it started; a moment for the kernel to
        # reap the workers whose raylet exited with it.
        deadline = time.monotonic() + 5
        while (left := processes_with_env("RAY_TMPDIR", marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        output = log.read_text()
        assert (returncode, process_names(left)) == (0, []), output[-4000:]
        assert ("SIGTERM" if stop == signal.SIGTERM else "Ctrl-C") + ": shutting down" in output
        print(f"stopped {stopped_s:.1f} s after {stop.name}")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in processes_with_env("RAY_TMPDIR", marker):  # never leak a Ray instance, pass or fail
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
