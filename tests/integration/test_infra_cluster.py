"""infra/local/ray_cluster.sh: a head and two worker nodes as separate `ray start` processes on 127.0.0.1.

One cluster serves the whole module (starting it is the slow part): jobs go in through `ray job
submit` against the job API, with the token the script generated, exactly as an operator would.
The node layout makes placement observable: the head offers no CPUs, each worker node offers 2 CPUs
and one unit of its own resource ``worker_node_<i>``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY_CLUSTER = REPO / "infra" / "local" / "ray_cluster.sh"
WORKER_CPUS = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(state_dir: Path) -> dict[str, str]:
    """This interpreter's bin first on PATH (ray, mlflow, python), and no address leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["INFRA_STATE_DIR"] = str(state_dir)
    return env


def run_script(
    script: Path, *args: str, env: dict[str, str], timeout: float = 400
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def client_env(cluster_env: dict[str, str]) -> dict[str, str]:
    """The cluster env plus what `ray_cluster.sh env` tells a client (job API address, auth token path)."""
    out = run_script(RAY_CLUSTER, "env", env=cluster_env).stdout
    env = dict(cluster_env)
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def pids_in(state: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted((state / "ray").glob("*.pid"))]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def group_alive(pgid: int, *, settle_s: float = 10.0) -> bool:
    """Whether the group still has live members after up to ``settle_s`` for the dying to go."""
    deadline = time.monotonic() + settle_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("infra-state")
    env = base_env(state) | {
        "RAY_HEAD_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_WORKER_CPUS": str(WORKER_CPUS),
        "RAY_OBJECT_STORE_BYTES": str(100_000_000),
    }
    started: list[int] = []
    try:
        result = run_script(RAY_CLUSTER, "start", "--workers", "2", env=env)
        started = pids_in(state)
        assert result.returncode == 0, result.stdout + result.stderr
        yield env, state
    finally:
        run_script(RAY_CLUSTER, "stop", env=env, timeout=120)
        for pgid in started + pids_in(state):  # whatever stop missed, by the ids we started
            if group_alive(pgid, settle_s=0):
                os.killpg(pgid, signal.SIGKILL)


def test_start_is_idempotent_and_status_is_healthy(cluster):
    env, state = cluster
    before = pids_in(state)
    again = run_script(RAY_CLUSTER, "start", "--workers", "2", env=env)
    assert again.returncode == 0, again.stderr
    assert "head already running" in again.stdout
    assert again.stdout.count("already running") == 3
    assert pids_in(state) == before  # nothing new was started
    status = run_script(RAY_CLUSTER, "status", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"0.0/{2 * WORKER_CPUS}.0 CPU" in status.stdout  # the head offers no CPU
    assert "worker_node_1" in status.stdout and "worker_node_2" in status.stdout


def test_job_submission_reaches_both_worker_nodes(cluster, tmp_path):
    env, _ = cluster
    (tmp_path / "probe.py").write_text(
        textwrap.dedent(
            """
            import json, ray
            ray.init()

            @ray.remote(num_cpus=1)
            def node_of_this_task():
                return ray.get_runtime_context().get_node_id()

            pinned = [
                ray.get(node_of_this_task.options(resources={f"worker_node_{i}": 1}).remote()) for i in (1, 2)
            ]
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            print("PROBE " + json.dumps({"alive": alive, "pinned": pinned}))
            """
        )
    )
    submit = subprocess.run(
        ["ray", "job", "submit", "--working-dir", str(tmp_path), "--", "python", "probe.py"],
        env=client_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    line = next(x for x in submit.stdout.splitlines() if x.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert len(probe["alive"]) == 3  # head + 2 worker nodes
    assert len(set(probe["pinned"])) == 2  # worker_node_1 and worker_node_2 are different nodes


def test_job_submission_without_the_token_is_refused(cluster, tmp_path):
    env, _ = cluster
    client = client_env(env)
    (tmp_path / "wrong-token").write_text("0" * 64)
    client["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "wrong-token")
    listing = subprocess.run(["ray", "job", "list"], env=client, capture_output=True, text=True, timeout=120)
    assert listing.returncode != 0
    assert "auth" in (listing.stdout + listing.stderr).lower()


def test_port_taken_by_another_process_is_a_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = base_env(tmp_path / "state") | {
            "RAY_HEAD_PORT": str(port),
            "RAY_DASHBOARD_PORT": str(free_port()),
            "RAY_CLIENT_PORT": str(free_port()),
        }
        result = run_script(RAY_CLUSTER, "start", env=env, timeout=60)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert not list((tmp_path / "state" / "ray").glob("*.pid"))  # nothing was started


MLFLOW_SERVER = REPO / "infra" / "local" / "mlflow_server.sh"
TOTAL_STEPS = 16  # configs/tiny.yaml with run.epochs=4: 4 epochs x 4 batches
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def tracking_server(cluster):
    """An MLflow server from infra/local/mlflow_server.sh (sqlite backend), beside the cluster."""
    env, state = cluster
    env = env | {"MLFLOW_PORT": str(free_port())}
    try:
        started = run_script(MLFLOW_SERVER, "start", env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        yield run_script(MLFLOW_SERVER, "uri", env=env).stdout.strip()
    finally:
        run_script(MLFLOW_SERVER, "stop", env=env, timeout=120)


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def job_status(env: dict[str, str], job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from `ray job status`."""
    out = ray_cli(env, "job", "status", job_id)
    text = out.stdout + out.stderr
    final = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", text)
    if final:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[final.group(1)]
    match = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
    assert match, text
    return match.group(1)


def wait_for_job(env: dict[str, str], job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(env, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(5)
    ray_cli(env, "job", "stop", job_id)
    return "TIMEOUT"


def train_worker_nodes(env: dict[str, str]) -> list[str]:
    """Node ids of every Ray Train worker actor of the cluster's jobs (dead ones included)."""
    out = ray_cli(env, "list", "actors", "--filter", "class_name=RayTrainWorker", "--format", "json",
                  "--detail", "--limit", "100").stdout  # fmt: skip
    return [actor["node_id"] for actor in json.loads(out)]


def test_training_job_survives_losing_a_worker_node(cluster, tracking_server, tmp_path_factory):
    """`ray job submit` of the real training entry: 2 workers that must sit on different nodes
    (each asks for a whole node's CPUs; the head has none), shards and checkpoints on a path every
    node sees. Mid-run one worker node is SIGKILLed and started again, as a replaced machine would
    be; Ray Train restarts the worker group from the last checkpoint (FailureConfig) and the run
    finishes with every step logged once, in one MLflow run, and a registered model."""
    from mlflow.tracking import MlflowClient

    env, state = cluster
    client_env_ = client_env(env)
    shared = tmp_path_factory.mktemp("shared")  # one directory every node of this cluster sees
    name = "infra-e2e"
    checkpoints = shared / "runs" / "checkpoints" / name
    job_id = f"infra-e2e-{os.getpid()}-{int(time.time())}"
    submit = ray_cli(
        client_env_,
        "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(REPO), "--",
        "python", "-m", "pipeline.train", "--config", "configs/tiny.yaml",
        f"run.name={name}", f"run.root={shared / 'runs'}", f"data.root={shared / 'data' / 'tiny'}",
        "run.epochs=4", "run.log_every=1", f"run.checkpoint_every={CHECKPOINT_EVERY}",
        "run.progress_bar=false",
        "ray.num_workers=2", f"ray.cpus_per_worker={WORKER_CPUS}", "ray.use_gpu=false", "ray.max_failures=3",
        f"mlflow.tracking_uri={tracking_server}", "mlflow.registered_model=infra-e2e",
        timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr

    # Lose worker node 2 once the first checkpoint is durable, while the job still runs.
    # Poll the filesystem, not the (slow) CLI, so the kill lands right after the first checkpoint.
    deadline = time.monotonic() + 400
    for poll in itertools.count():
        if list(checkpoints.glob("checkpoint_*")):
            break
        if poll % 20 == 19:
            assert job_status(client_env_, job_id) in ("PENDING", "RUNNING")
        assert time.monotonic() < deadline, "no checkpoint within 400 s"
        time.sleep(0.5)
    lost = int((state / "ray" / "worker-2.pid").read_text())
    killed = run_script(RAY_CLUSTER, "kill-worker", "2", env=env)
    assert killed.returncode == 0, killed.stderr
    assert not group_alive(lost)
    assert job_status(client_env_, job_id) == "RUNNING"  # mid-run
    status = run_script(RAY_CLUSTER, "status", env=env)
    assert status.returncode == 1 and "worker-2: stopped" in status.stdout  # degraded, and says which
    replaced = run_script(RAY_CLUSTER, "start", "--workers", "2", env=env)  # what an autoscaler would do
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "worker node 1 already running" in replaced.stdout and "starting worker node 2" in replaced.stdout
    assert int((state / "ray" / "worker-2.pid").read_text()) != lost

    final = wait_for_job(client_env_, job_id, timeout=500)
    logs = ray_cli(client_env_, "job", "logs", job_id).stdout
    assert final == "SUCCEEDED", logs[-5000:]
    assert f"done: step {TOTAL_STEPS}," in logs
    assert "registered infra-e2e v1" in logs

    client = MlflowClient(tracking_server)
    version = client.get_model_version_by_alias("infra-e2e", "newest")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.world_size"] == "2"
    resumed = int(run.data.tags["pipeline.resumed_from_step"])  # set only by a restart
    assert resumed in range(CHECKPOINT_EVERY, TOTAL_STEPS, CHECKPOINT_EVERY)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/bits_per_dim")]
    # Every step exactly once, also when the node died between a report's barrier and the
    # controller registering that checkpoint (pipeline/tracking.py skips steps MLflow already holds).
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1)), steps
    assert (checkpoints / f"checkpoint_{TOTAL_STEPS:09d}").is_dir()  # on the shared path

    # Each worker group had its two workers on two different nodes.
    nodes = train_worker_nodes(client_env_)
    assert len(nodes) >= 4  # the first group and the restarted one
    assert len(set(nodes)) >= 2 and all(nodes.count(n) <= len(nodes) // 2 for n in set(nodes))


def test_stop_ends_every_process_it_started(tmp_path_factory, cluster):
    env, state = cluster
    pgids = pids_in(state)
    assert len(pgids) == 3
    stopped = run_script(RAY_CLUSTER, "stop", env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert [pgid for pgid in pgids if group_alive(pgid)] == []
    assert run_script(RAY_CLUSTER, "status", env=env).returncode == 3
    assert run_script(RAY_CLUSTER, "stop", env=env).stdout.strip().endswith("not running")
