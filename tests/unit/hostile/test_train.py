"""Hostile inputs, classes 8 and 9 (issue 21): `python -m pipeline.train` against another tracking
server, and against a machine that says no, ends in one `error:` line and exit 2, not a traceback.

Real runs (--no-ray, the tiny config), a real MLflow sqlite store per "server".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config, resolve
from pipeline.data import ensure_data
from pipeline.faults import Faults, InjectedFault
from pipeline.loop import fit

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hostile-train")
    cfg = resolve(load_config(CONFIG, overrides(work, "server-a")), cwd=work)
    ensure_data(cfg.data, cfg.model.image_shape)
    return work


def overrides(work: Path, server: str, *more: str) -> list[str]:
    return [
        "ray.enabled=false", "run.progress_bar=off", "run.num_threads=1", "mlflow.register=false",
        "mlflow.log_model=false", "mlflow.log_checkpoint=false", "mlflow.system_metrics=false",
        f"mlflow.tracking_uri=sqlite:///{work / server}.db", f"data.root={work / 'data'}",
        f"run.root={work / 'runs'}", *more,
    ]  # fmt: skip


def train_cli(args: list[str], capsys) -> tuple[int, str]:
    """``python -m pipeline.train --config tiny.yaml ARGS`` in this process: (exit code, stderr)."""
    from pipeline.train import main

    capsys.readouterr()
    code = main(["--config", str(CONFIG), *args])
    return code, capsys.readouterr().err


def one_error_line(done: tuple[int, str]) -> str:
    code, err = done
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def crashed_on_server_a(workdir):
    """A run that checkpointed at step 2 under server A's MLflow run, then died."""
    more = ("run.name=moved", "run.checkpoint_every=2")
    cfg = resolve(load_config(CONFIG, overrides(workdir, "server-a", *more)), cwd=workdir)
    with pytest.raises(InjectedFault):
        fit(cfg, faults=Faults(fail_at_step=3))
    (old_run,) = MlflowClient(f"sqlite:///{workdir / 'server-a'}.db").search_runs(["0", "1"])
    return old_run.info.run_id, more


def test_resume_against_a_server_without_the_run_names_it_and_the_ways_on(
    workdir, crashed_on_server_a, capsys
):
    old_id, more = crashed_on_server_a
    line = one_error_line(train_cli(overrides(workdir, "server-b", *more), capsys))
    assert old_id in line and f"sqlite:///{workdir / 'server-b'}.db" in line
    assert "run.name" in line and "mlflow.on_missing_run=new" in line


def test_on_missing_run_new_keeps_the_progress_in_a_tagged_new_run(workdir, crashed_on_server_a):
    old_id, more = crashed_on_server_a
    cfg = resolve(
        load_config(CONFIG, overrides(workdir, "server-c", *more, "mlflow.on_missing_run=new")), cwd=workdir
    )
    result = fit(cfg)
    assert result.mlflow_run_id != old_id
    run = MlflowClient(f"sqlite:///{workdir / 'server-c'}.db").get_run(result.mlflow_run_id)
    assert run.data.tags["pipeline.previous_run_id"] == old_id
    assert run.data.tags["pipeline.resumed_from_step"] == "2"


def test_run_root_that_is_a_file_is_one_error_line(workdir, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    args = [*overrides(workdir, "server-d", "run.name=blocked"), f"run.root={blocker}"]
    assert str(blocker) in one_error_line(train_cli(args, capsys))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_root_is_one_error_line(workdir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    args = [*overrides(workdir, "server-e", "run.name=ro"), f"run.root={locked / 'runs'}"]
    assert str(locked) in one_error_line(train_cli(args, capsys))


def test_unreachable_object_storage_is_one_error_line(workdir, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
    }  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [*overrides(workdir, "server-f", "run.name=s3"), "run.root=s3://bucket/runs"]
    line = one_error_line(train_cli(args, capsys))
    assert "127.0.0.1" in line or "s3://bucket" in line
