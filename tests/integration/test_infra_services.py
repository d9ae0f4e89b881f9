"""infra/local/mlflow_server.sh and infra/local/postgres.sh: real servers on 127.0.0.1, real clients.

The MLflow server runs on its sqlite default and, where PostgreSQL's server binaries and psycopg2
are installed, on a throwaway PostgreSQL cluster; runs and artifacts are written through the server
and read back from where the server stored them.
"""

from __future__ import annotations

import base64
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.conftest import _stop, _wait_healthy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
K8S_MLFLOW = REPO / "infra" / "k8s" / "mlflow.yaml"
MLFLOW_SERVER = REPO / "infra" / "local" / "mlflow_server.sh"
POSTGRES = REPO / "infra" / "local" / "postgres.sh"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PG_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["INFRA_STATE_DIR"] = str(state_dir)
    return env


def run_script(script: Path, *args: str, env: dict[str, str], timeout: float = 300):
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def log_a_run(uri: str, tmp_path: Path) -> str:
    """A run with a param, a metric series and an artifact, written through the server."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(f"infra-{tmp_path.name}")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_param("depth", 3)
            for step in range(3):
                mlflow.log_metric("bits_per_dim", 4.0 - step, step=step)
            note = tmp_path / "note.txt"
            note.write_text("stored by the server")
            mlflow.log_artifact(str(note))
    finally:
        mlflow.set_tracking_uri(None)
    history = client.get_metric_history(run.info.run_id, "bits_per_dim")
    assert [m.step for m in history] == [0, 1, 2]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    return run.info.run_id


@pytest.fixture
def stop_after(request):
    """Scripts whose ``stop`` must run at the end of the test, with their env."""
    started: list[tuple[Path, dict[str, str]]] = []
    yield started.append
    for script, env in reversed(started):
        run_script(script, "stop", env=env, timeout=120)


def test_mlflow_server_on_sqlite(tmp_path, stop_after):
    state = tmp_path / "state"
    env = base_env(state) | {"MLFLOW_PORT": str(free_port())}
    stop_after((MLFLOW_SERVER, env))
    started = run_script(MLFLOW_SERVER, "start", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    uri = run_script(MLFLOW_SERVER, "uri", env=env).stdout.strip()
    assert uri == f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    again = run_script(MLFLOW_SERVER, "start", env=env)
    assert again.returncode == 0 and "already running" in again.stdout

    run_id = log_a_run(uri, tmp_path)
    assert (state / "mlflow" / "mlflow.db").stat().st_size > 0
    stored = list((state / "mlflow" / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and run_id in str(stored[0])

    # Another state dir on the same port: refused with a clear message, nothing started.
    other = env | {"INFRA_STATE_DIR": str(tmp_path / "other")}
    taken = run_script(MLFLOW_SERVER, "start", env=other)
    assert taken.returncode == 1
    assert f"port {env['MLFLOW_PORT']} on 127.0.0.1 is already in use" in taken.stderr
    assert not (tmp_path / "other" / "mlflow" / "server.pid").exists()

    pid = int((state / "mlflow" / "server.pid").read_text())
    assert run_script(MLFLOW_SERVER, "status", env=env).returncode == 0
    stopped = run_script(MLFLOW_SERVER, "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not process_alive(pid)
    assert run_script(MLFLOW_SERVER, "status", env=env).returncode == 3


def postgres_missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") and not shutil.which("pg_ctl"):
        return "PostgreSQL server binaries are not installed (apt-get install -y postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' OS user to run the server"
    return None


@pytest.fixture
def pg_state():
    """As root the server runs as the postgres OS user, which must reach its data dir: pytest's
    tmp_path sits in a 0700 directory, so the state dir is a world-traversable temp dir. Its name
    has a space and a quote, which the scripts must pass through intact. Requested before
    ``stop_after``, it is removed after the servers are stopped."""
    state = Path(tempfile.mkdtemp(prefix="infra pg's state "))
    state.chmod(0o755)
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))
def test_mlflow_server_on_postgres(pg_state, stop_after, tmp_path):
    from sqlalchemy import create_engine, text

    state = pg_state
    env = base_env(state) | {"PG_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    stop_after((POSTGRES, env))
    pg = run_script(POSTGRES, "start", env=env)
    assert pg.returncode == 0, pg.stdout + pg.stderr
    assert "already running" in run_script(POSTGRES, "start", env=env).stdout
    backend_uri = run_script(POSTGRES, "uri", env=env).stdout.strip()
    password = (state / "postgres" / "password").read_text().strip()
    assert backend_uri.startswith("postgresql+psycopg2://mlflow:") and password in backend_uri
    assert oct((state / "postgres" / "password").stat().st_mode & 0o777) == "0o600"

    server_env = env | {"MLFLOW_BACKEND_URI": backend_uri}
    stop_after((MLFLOW_SERVER, server_env))
    started = run_script(MLFLOW_SERVER, "start", env=server_env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "postgresql+psycopg2://mlflow:***@127.0.0.1" in started.stdout
    status = run_script(MLFLOW_SERVER, "status", env=env)  # a later shell, without the URI
    assert status.returncode == 0 and "mlflow:***@" in status.stdout

    uri = run_script(MLFLOW_SERVER, "uri", env=env).stdout.strip()
    run_id = log_a_run(uri, tmp_path)
    engine = create_engine(backend_uri)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT run_uuid FROM runs")).scalars().all()
            metrics = connection.execute(
                text("SELECT count(*) FROM metrics WHERE run_uuid = :r"), {"r": run_id}
            ).scalar_one()
    finally:
        engine.dispose()
    assert rows == [run_id] and metrics == 3  # the server wrote to PostgreSQL, not to sqlite
    assert not (state / "mlflow" / "mlflow.db").exists()

    # The password shows up nowhere but in its 0600 file: not in output, logs or command lines.
    pid = int((state / "mlflow" / "server.pid").read_text())
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in _group(pid)]
    seen = started.stdout + started.stderr + pg.stdout + pg.stderr + status.stdout
    seen += (state / "mlflow" / "server.log").read_text() + (state / "postgres" / "server.log").read_text()
    assert password not in seen
    assert all(password.encode() not in c for c in cmdlines) and len(cmdlines) >= 1

    assert run_script(MLFLOW_SERVER, "stop", env=env).returncode == 0
    assert run_script(POSTGRES, "stop", env=env).stdout.strip().endswith("stopped")
    assert run_script(POSTGRES, "status", env=env).returncode == 3


def _group(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _status(
    url: str, *, user: str | None = None, password: str | None = None, data: bytes | None = None
) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def auth_app_missing() -> str | None:
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        return "MLflow's basic-auth app needs mlflow[auth] (Flask-WTF), which is not installed"
    return None


@pytest.mark.skipif(auth_app_missing() is not None, reason=str(auth_app_missing()))
def test_mlflow_server_as_kubernetes_runs_it_requires_credentials(tmp_path, monkeypatch):
    """infra/k8s/mlflow.yaml's command and auth settings, run for real on loopback with a sqlite
    store: anonymous requests get 401 (except /health, which the probes use), the admin from the
    environment exists, a `trainer` user created as docs/operations.md says logs runs and moves
    its model's alias, and another user cannot move that alias."""
    from mlflow.server import get_app_client

    deployment = next(d for d in yaml.safe_load_all(K8S_MLFLOW.read_text()) if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    local_only = ("--host=", "--port=", "--workers=", "--allowed-hosts=")
    port = free_port()
    argv = [Path(sys.executable).with_name(a) if a == "mlflow" else a for a in container["command"]]
    argv = [str(a) for a in argv if not str(a).startswith(local_only)]
    argv += ["--host=127.0.0.1", f"--port={port}", "--workers=1"]
    argv += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    argv += ["--artifacts-destination", str(tmp_path / "artifacts")]
    config_path = tmp_path / "basic_auth.ini"  # what the Secret's basic_auth.ini holds, on sqlite
    config_path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    admin_password, trainer_password, other_password = (secrets.token_urlsafe(16) for _ in range(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # The Deployment sets the same variables (from the Secret, checked in tests/unit/infra/test_manifests.py).
    assert {k for k in env if k.startswith("MLFLOW_")} <= {e["name"] for e in container["env"]}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(f"{url}/health") == 200
        assert _status(search) == 401
        assert _status(search, user="admin", password="wrong") == 401
        assert _status(search, user="admin", password=admin_password) == 200

        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        users = get_app_client("basic-auth", tracking_uri=url)
        users.create_user("trainer", trainer_password)
        users.create_user("other", other_password)

        # The Ray pods' view: credentials from MLFLOW_TRACKING_USERNAME / _PASSWORD.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", trainer_password)
        client = MlflowClient(url)
        experiment_id = client.create_experiment("auth-check")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "bits_per_dim", 3.5, step=0)
        client.create_registered_model("eiw-flow")
        version = client.create_model_version("eiw-flow", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_registered_model_alias("eiw-flow", "champion", version.version)

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "other")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", other_password)
        other = MlflowClient(url)
        assert other.get_model_version_by_alias("eiw-flow", "champion").version == version.version  # READ
        with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403"):
            other.set_registered_model_alias("eiw-flow", "champion", version.version)
        with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403"):
            other.log_metric(run.info.run_id, "bits_per_dim", 0.0, step=1)
    finally:
        _stop(proc)
    assert admin_password not in log.read_text()
