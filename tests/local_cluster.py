"""A real `ray start` cluster on loopback for the end-to-end tests, and `ray job submit` against it."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_processes import ROOT, VENV_BIN, free_ports, run_environment, stop_process_group

RUN_TIMEOUT_S = 900  # one micro run: ~3-5 min on 2 idle cores, more on a busy CI machine


@dataclass
class LocalCluster:
    """A `ray start --head --block` cluster on loopback, with token authentication."""

    dashboard_url: str
    env: dict[str, str]
    gcs_address: str


HEAD_STARTED = "This command will now block forever"  # `ray start --block` prints it once the node is up
HEAD_START_ATTEMPTS = 3  # Ray gives the raylet a fixed 30 s to register, which a busy CI machine can miss


@contextlib.contextmanager
def local_cluster(log_path: Path) -> Iterator[LocalCluster]:
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = run_environment(ray_tmpdir)
    # Ray 2.60 turns token auth on; both the cluster and the CLI get the same fresh token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # SIGTERM would otherwise wait up to 30 s for the node to drain (the job's Serve replicas stay up).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    head = None
    try:
        for attempt in range(1, HEAD_START_ATTEMPTS + 1):
            head, url, gcs_address = start_head(env, log_path)
            if wait_for_head(head, url, env["RAY_AUTH_TOKEN"], log_path):
                break
            stop_process_group(head, ray_tmpdir)
            assert attempt < HEAD_START_ATTEMPTS, f"`ray start` failed {attempt} times:\n{log_path.read_text()[-4000:]}"
        yield LocalCluster(url, env, gcs_address)
    finally:
        if head is not None:
            stop_process_group(head, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def start_head(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` on free loopback ports, in its own process group; returns it, the dashboard URL
    and the GCS address other nodes join."""
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", "--num-cpus=2", "--disable-usage-stats",
    ]  # fmt: skip
    with log_path.open("a") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}"


def start_worker_node(cluster: LocalCluster, log_path: Path, timeout_s: float = 180) -> subprocess.Popen:
    """A second node joining the cluster on loopback (`ray start --address --block`), up when this returns."""
    agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
    command = [
        str(VENV_BIN / "ray"), "start", f"--address={cluster.gcs_address}", "--block", "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}", "--num-cpus=1",
        "--disable-usage-stats",
    ]  # fmt: skip
    with log_path.open("a") as log:
        worker = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while HEAD_STARTED not in log_path.read_text():
        assert worker.poll() is None and time.monotonic() < deadline, f"the worker node did not start:\n{log_path.read_text()[-4000:]}"
        time.sleep(1)
    return worker


def wait_for_head(head: subprocess.Popen, url: str, token: str, log_path: Path, timeout_s: float = 180) -> bool:
    """True once the node is up and the dashboard answers; False if `ray start` gave up."""
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return False
        if HEAD_STARTED in log_path.read_text():
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return True
        time.sleep(1)
    pytest.fail(f"the Ray head at {url} did not come up in {timeout_s}s:\n{log_path.read_text()[-4000:]}")


def submit(cluster: LocalCluster, args: list[str], log_path: Path) -> float:
    """`ray job submit` the driver (following its logs until it ends); returns the wall time."""
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT),
               "--", "python", *args]  # fmt: skip
    started = time.perf_counter()
    for _ in range(3):
        with log_path.open("w") as log:
            result = subprocess.run(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        output = log_path.read_text()
        # The dashboard answers before the head's job agent registers; the job was not created then.
        if "No available agent to submit job" not in output:
            break
        time.sleep(5)
    seconds = time.perf_counter() - started
    assert result.returncode == 0 and "succeeded" in output, f"job failed:\n{output[-6000:]}"
    return seconds
