"""Real services for integration tests: an ``mlflow server`` on a sqlite backend, local Ray, tiny shards.

Everything binds to 127.0.0.1 on free ports and is stopped at the end of the session: the MLflow
server's whole process group is terminated (then killed if it lingers) and Ray is shut down.
The machine is small and shared, so Ray gets more logical CPUs than there are cores (4).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MLFLOW = Path(sys.executable).with_name("mlflow")

# Ray Train gives a worker group 60 s to start. Ray runs its worker processes at a lower priority
# (nice), so on a busy 2-core machine importing torch in them alone can take longer than that; the
# driver propagates this variable to the controller and the workers.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    root: Path
    log: Path


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers: our own process group
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on 127.0.0.1 and a free port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(MLFLOW), "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield MlflowServer(uri=url, root=root, log=log)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray instance for the session (never an existing cluster on this machine)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """The built-in sample set, tiny (64 train / 32 test images, 16 per shard), as real shards."""
    from data_prep.sources.sample import ensure_sample_shards

    root = tmp_path_factory.mktemp("shards") / "sample-32-tiny"
    return ensure_sample_shards(root, resolution=32, n_train=64, n_test=32, shard_size=16)
