"""The tiny search against real services: local Ray (4 logical CPUs), a real ``mlflow server``, real shards.

One search (configs/tune/tiny.yaml: a 2 x 2 grid over the learning rate and sigma, 16 steps per trial,
an ASHA rung at step 8) is interrupted the way Ctrl-C does it as soon as its first trial completes, then
resumed by running it again with the same name and storage path. The tests below read what the two
runs left behind: the Tune experiment, the MLflow parent and trial runs, and the registry.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline.loop import FINAL_STEP_TAG
from pipeline.registry import load_flow_model
from tune.report import PLOT_NAMES, TABLE_NAME
from tune.search import run_search
from tune.spec import spec_from_dict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 16
RUNG = 8


class InterruptAfterFirstCompletion(tune.Callback):
    """Send this process SIGINT (Tune's Ctrl-C handler) when the first trial completes, once: Tune pickles
    its callbacks with the experiment, so the marker file keeps the restored copy quiet."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_shards, mlflow_server, ray_local):
    tmp = tmp_path_factory.mktemp("tune")
    data = yaml.safe_load((ROOT / "configs" / "tune" / "tiny.yaml").read_text())
    data["base_config"] = str(ROOT / "configs" / "tiny.yaml")
    data["overrides"]["data.root"] = str(tiny_shards)
    data["run"]["storage_path"] = str(tmp / "storage")
    data["mlflow"].update(
        tracking_uri=mlflow_server.uri, experiment="tune-tiny-test", registered_model_name="tune-tiny-test"
    )
    spec = spec_from_dict(data)
    marker = tmp / "interrupted-after"
    started = time.monotonic()
    first = run_search(spec, callbacks=[InterruptAfterFirstCompletion(marker)])
    assert marker.exists(), "the search finished without any trial completing"
    # A Ctrl-C'd search ends its process and the embedded Ray with it; restart Ray the same way, so the
    # interrupted trial's controller and worker group cannot keep holding CPUs the resume needs.
    ray_local.shutdown()
    ray_local.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    second = run_search(spec)
    print(f"tiny search: interrupted + resumed in {time.monotonic() - started:.0f}s")
    return SimpleNamespace(
        spec=spec,
        first=first,
        second=second,
        finished_first=marker.read_text(),
        client=MlflowClient(mlflow_server.uri),
    )


def rows_by_id(outcome) -> dict:
    return {row.trial_id: row for row in outcome.rows}


def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    first, second, client = search.first, search.second, search.client
    assert first.interrupted and not first.resumed
    assert second.resumed and not second.interrupted
    assert second.parent_run_id == first.parent_run_id
    assert second.experiment_path == first.experiment_path

    before, after = rows_by_id(first), rows_by_id(second)
    assert len(after) == 4 and set(before) <= set(after)
    done_id = search.finished_first
    assert before[done_id].status in ("completed", "stopped_early")
    assert [row for row in before.values() if row.status == "unfinished"], "nothing was left to resume"

    # The trial that had finished is not run again: Tune got no new report from it, its MLflow run
    # was never reopened, and it logged every evaluation exactly once.
    trial_dir = first.experiment_path / f"trial_id={done_id}"
    reports = [yaml.safe_load(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]
    assert [r["step"] for r in reports] == list(range(4, before[done_id].step + 1, 4))
    done_run = client.get_run(after[done_id].mlflow_run_id)
    assert "pipeline.resumed_from_step" not in done_run.data.tags
    steps = [m.step for m in client.get_metric_history(done_run.info.run_id, "test/bits_per_dim")]
    assert steps == sorted(set(steps))

    # A trial cut off mid-run continued its own Ray Train checkpoints and MLflow run.
    for trial_id, row in before.items():
        if row.status == "unfinished" and row.step > 0:
            run = client.get_run(after[trial_id].mlflow_run_id)
            assert after[trial_id].mlflow_run_id == row.mlflow_run_id
            assert int(run.data.tags["pipeline.resumed_from_step"]) >= row.step

    # Every trial is one MLflow run nested under the search's parent run.
    children = client.search_runs(
        [done_run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{second.parent_run_id}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(r.mlflow_run_id for r in after.values())
    assert sorted(r.info.run_name for r in children) == sorted(f"train-trial_id={t}" for t in after)


def test_asha_stops_the_trials_that_do_not_learn(search):
    rows = search.second.rows
    stopped = [r for r in rows if r.status == "stopped_early"]
    assert stopped, [(r.trial_id, r.status, r.step) for r in rows]
    for row in rows:
        if row.values["optim.lr"] < 1e-6:  # cannot learn: worse than the trials that ran first
            assert row.status == "stopped_early" and row.step == RUNG, row
    assert any(r.status == "completed" and r.step == TOTAL_STEPS for r in rows)
    for row in stopped:
        run = search.client.get_run(row.mlflow_run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["tune.stopped_early_at_step"] == str(row.step)
        assert FINAL_STEP_TAG not in run.data.tags  # it never reached the end, so it logged no model


def test_parent_run_holds_the_table_and_the_plots(search, tmp_path):
    client, parent_id = search.client, search.second.parent_run_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.loss.sigma"] == "grid[0.0001, 1.0]"
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {TABLE_NAME, *PLOT_NAMES} <= names, names
    local = Path(client.download_artifacts(parent_id, TABLE_NAME, str(tmp_path)))
    lines = local.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["trial_id", "status", "step", "test_bits_per_dim", "best_test_bits_per_dim"]
    assert {"optim.lr", "loss.sigma", "model.num_steps", "model.num_levels", "mlflow_run_id"} <= set(
        header
    )
    table = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert table.keys() == rows_by_id(search.second).keys()
    for trial_id, row in rows_by_id(search.second).items():
        assert table[trial_id][1] == row.status and int(table[trial_id][2]) == row.step
    for name in PLOT_NAMES:
        png = Path(client.download_artifacts(parent_id, name, str(tmp_path)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_best_trial_model_is_registered_with_the_alias(search):
    spec, client, outcome = search.spec, search.client, search.second
    completed = [r for r in outcome.rows if r.status == "completed"]
    best = min(completed, key=lambda r: r.test_bits_per_dim)
    assert outcome.best is not None and outcome.best.trial_id == best.trial_id
    name = spec.mlflow.registered_model_name
    version = client.get_model_version_by_alias(name, spec.mlflow.alias)
    assert version.version == outcome.model_version
    assert version.run_id == best.mlflow_run_id
    assert version.tags["tune.trial_id"] == best.trial_id
    assert float(version.tags["test_bits_per_dim"]) == pytest.approx(best.test_bits_per_dim)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # only the best, only once

    model = load_flow_model(f"models:/{name}@{spec.mlflow.alias}", tracking_uri=client.tracking_uri)
    images = torch.randint(
        0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert all(math.isfinite(v) for v in model.bits_per_dim(images).tolist())
    assert model.sample(2, temperature=0.7).shape == (2, 3, 32, 32)
