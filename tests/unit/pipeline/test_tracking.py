"""pipeline.tracking: live (asynchronous) metrics, each step once across restarts, stepped images,
dataset inputs, the order history across restarts, system metrics. A real MLflow sqlite store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import MlflowConfig, load_config
from pipeline.final_artifacts import should_log_checkpoint
from pipeline.lineage import ShardDataset
from pipeline.order_picture import OrderHistory
from pipeline.sampling import grid_images, image_key
from pipeline.system_metrics import logs_this_node, node_id
from pipeline.tracking import Tracker, image_key_and_step, multipart_uploads


def config(tmp_path: Path, **overrides) -> MlflowConfig:
    settings = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tracking-test"}
    return MlflowConfig(**{**settings, "system_metrics": False, **overrides})


def started(cfg: MlflowConfig, tmp_path: Path, run_id: str | None = None, resumed_from=None) -> Tracker:
    tracker = Tracker(cfg, active=True, run_root=tmp_path)
    tracker.start(run_id=run_id, run_name="r", params={"a": 1}, tags={}, resumed_from=resumed_from)
    return tracker


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_reopened_run_skips_steps_mlflow_already_holds(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = started(cfg, tmp_path)
    for step in (1, 2, 4):  # step 3's values never reached the server (lost in the crash)
        first.log_metrics(step, {"train/bits_per_dim": 10.0 - step})
    first.end("FAILED")

    # The restart resumes from the checkpoint at step 2 and recomputes steps 3 and 4.
    second = started(cfg, tmp_path, run_id=first.run_id, resumed_from=2)
    for step in range(3, 7):
        second.log_metrics(step, {"train/bits_per_dim": 20.0 + step, "test/bits_per_dim": 5.0})
    second.end()

    history = MlflowClient(cfg.tracking_uri).get_metric_history(first.run_id, "train/bits_per_dim")
    by_step = {m.step: m.value for m in history}
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert by_step[4] == 6.0, "a step MLflow holds keeps its first value"
    assert by_step[3] == 23.0, "a step the lost attempt never delivered is logged by the resumed run"
    assert by_step[5] == 25.0
    # A metric the first attempt never logged is logged in full.
    assert steps_of(cfg.tracking_uri, first.run_id, "test/bits_per_dim") == [3, 4, 5, 6]


def test_a_run_resumes_whatever_experiment_the_caller_made_active(tmp_path: Path) -> None:
    import mlflow

    cfg = config(tmp_path)
    first = started(cfg, tmp_path)
    first.end("FAILED")
    mlflow.set_tracking_uri(cfg.tracking_uri)
    other = mlflow.set_experiment("a-notebook's-experiment").experiment_id
    try:
        second = started(cfg, tmp_path, run_id=first.run_id, resumed_from=0)  # MLflow alone refuses this
        assert second.run_id == first.run_id
        second.end()
        from mlflow.tracking import fluent

        assert fluent._active_experiment_id == other  # the caller's choice is put back
    finally:
        from mlflow.tracking import fluent

        fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def test_live_metrics_are_asynchronous_and_all_arrive(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.async_metrics
    tracker = started(cfg, tmp_path)
    for step in range(1, 51):
        tracker.log_metrics(step, {f"train/m{i}": float(step * i) for i in range(10)})
    assert tracker._pending, "asynchronous log_batch calls return operations to wait for"
    tracker.wait()
    assert not tracker._pending
    client = MlflowClient(cfg.tracking_uri)
    assert steps_of(cfg.tracking_uri, tracker.run_id, "train/m3") == list(range(1, 51))
    assert client.get_run(tracker.run_id).data.metrics["train/m3"] == 150.0
    tracker.end()

    synchronous = started(config(tmp_path, async_metrics=False), tmp_path)
    synchronous.log_metrics(1, {"train/x": 1.0})
    assert not synchronous._pending
    assert steps_of(cfg.tracking_uri, synchronous.run_id, "train/x") == [1]
    synchronous.end()


def test_stepped_images_once_per_key_and_step_across_restarts(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    grids = {0.7: torch.rand(3, 10, 12), 1.0: torch.rand(3, 10, 12)}
    images = grid_images(grids)
    assert set(images) == {"samples_T0.7", "samples_T1"} and image_key(0.5) == "samples_T0.5"
    assert images["samples_T1"].shape == (10, 12, 3) and images["samples_T1"].dtype == np.uint8
    assert grid_images({1.0: torch.rand(1, 4, 4)})["samples_T1"].shape == (4, 4)

    first = started(cfg, tmp_path)
    first.log_images(4, images)
    first.end("FAILED")
    second = started(cfg, tmp_path, run_id=first.run_id, resumed_from=0)
    second.log_images(4, images)  # recomputed after the restart: already there
    second.log_images(8, images)
    second.end()

    files = [a.path for a in MlflowClient(cfg.tracking_uri).list_artifacts(first.run_id, "images")]
    found = sorted(image_key_and_step(p) for p in files if p.endswith(".png"))
    assert found == [("samples_T0.7", 4), ("samples_T0.7", 8), ("samples_T1", 4), ("samples_T1", 8)]
    assert image_key_and_step("images/a~b+step+12+timestamp+1+u.png") == ("a/b", 12)
    assert image_key_and_step("samples/x.png") is None


def test_order_history_survives_a_restart_from_an_earlier_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = started(cfg, tmp_path)
    for step in (2, 4, 6):
        first.record_order(step, [torch.full((4,), step / 10), torch.zeros(8)])
    first.save_order()  # at the checkpoint of step 6; the restart comes from step 4's
    first.end("FAILED")

    second = started(cfg, tmp_path, run_id=first.run_id, resumed_from=4)
    assert second.order.steps == [2, 4]
    np.testing.assert_allclose(second.order.matrices()[0][:, 1], 0.4)
    second.record_order(6, [torch.ones(4), torch.ones(8)])
    second.log_order_picture(title="t")
    second.end()
    paths = [a.path for a in MlflowClient(cfg.tracking_uri).list_artifacts(first.run_id, "order")]
    assert sorted(paths) == ["order/kept_share.npz", "order/kept_share.png"]

    no_splits = started(cfg, tmp_path)
    no_splits.record_order(2, [])
    no_splits.log_order_picture(title="t")  # nothing to draw: no artifact
    assert MlflowClient(cfg.tracking_uri).list_artifacts(no_splits.run_id, "order") == []
    no_splits.end()


def write_manifest(split_dir: Path, split: str, shards: list[tuple[str, str, int]]) -> None:
    split_dir.mkdir(parents=True)
    manifest = {
        "source": "imagenet64", "split": split, "resolution": [64, 64], "channels": 3, "n_bits": 8,
        "sample_format": "png", "total": sum(c for _, _, c in shards), "complete": True,
        "shards": [{"name": n, "sha256": h, "count": c} for n, h, c in shards],
    }  # fmt: skip
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


def test_dataset_inputs_carry_the_manifest_digest(tmp_path: Path) -> None:
    shards = [("train-000000.tar", "a" * 64, 10), ("train-000001.tar", "b" * 64, 7)]
    write_manifest(tmp_path / "data" / "train", "train", shards)
    write_manifest(tmp_path / "data" / "test", "test", [("test-000000.tar", "c" * 64, 5)])
    expected = hashlib.sha256(f"train-000000.tar {'a' * 64} 10\ntrain-000001.tar {'b' * 64} 7\n".encode())

    cfg = config(tmp_path)
    tracker = started(cfg, tmp_path)
    tracker.log_datasets({"training": ShardDataset(tmp_path / "data" / "train")})
    tracker.log_datasets({"training": ShardDataset(tmp_path / "data" / "train")})  # a resume: no new input
    tracker.end()

    inputs = MlflowClient(cfg.tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.digest == expected.hexdigest()[:16] and dataset.name == "imagenet64-64x64-train"
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]
    profile = json.loads(dataset.profile)
    assert profile["shards_sha256"] == expected.hexdigest()
    assert (profile["source"], profile["resolution"], profile["num_images"]) == ("imagenet64", [64, 64], 17)
    assert json.loads(dataset.source)["uri"] == str((tmp_path / "data" / "train").resolve())


NODE_METRICS = """
import sys, time
from pipeline.config import MlflowConfig
from pipeline.tracking import Tracker
uri, run_id = sys.argv[1:]
tracker = Tracker(MlflowConfig(tracking_uri=uri, system_metrics_interval_s=0.2), active=False, run_root=".")
tracker.follow_node_metrics(run_id)
time.sleep(3)
tracker.end("FINISHED")
"""


def _wait_for_metric(client: MlflowClient, run_id: str, key: str) -> None:
    deadline = time.monotonic() + 60
    while key not in client.get_run(run_id).data.metrics:
        assert time.monotonic() < deadline, f"no {key} after 60 s"
        time.sleep(0.2)


def test_system_metrics_from_every_node_keyed_by_node(tmp_path: Path, monkeypatch) -> None:
    # This process is rank 0 on node 0; a second process plays node 1's local rank 0 (the
    # environment Ray Train gives it) and logs into the same run through MLflow's public API.
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    for var in ("NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = config(tmp_path, system_metrics=True, system_metrics_interval_s=0.2)
    tracker = started(cfg, tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    env = {**os.environ, "NODE_RANK": "1", "LOCAL_RANK": "0", "RANK": "4"}
    node1 = subprocess.run(
        [sys.executable, "-c", NODE_METRICS, cfg.tracking_uri, tracker.run_id],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert node1.returncode == 0, node1.stderr[-3000:]
    _wait_for_metric(client, tracker.run_id, "system/node_0/cpu_utilization_percentage")
    tracker.end()
    run = client.get_run(tracker.run_id)
    keys = set(run.data.metrics)
    for node in ("node_0", "node_1"):
        assert {
            f"system/{node}/system_memory_usage_megabytes",
            f"system/{node}/disk_usage_percentage",
        } <= keys
    assert not any(k.startswith("system/") and k.count("/") == 1 for k in keys)  # none without a node
    assert run.info.status == "FINISHED"
    assert "MLFLOW_SYSTEM_METRICS_NODE_ID" not in os.environ  # the process's settings put back


@pytest.mark.parametrize(
    ("env", "logs", "node"),
    [
        ({}, True, "node_0"),  # a plain single-process run
        ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True, "node_0"),
        ({"NODE_RANK": "0", "LOCAL_RANK": "3"}, False, "node_0"),
        ({"NODE_RANK": "2", "LOCAL_RANK": "0"}, True, "node_2"),
        ({"NODE_RANK": "2", "LOCAL_RANK": "1"}, False, "node_2"),
    ],
)
def test_one_process_per_node_logs_system_metrics(env, logs, node) -> None:
    assert logs_this_node(env) is logs
    assert node_id(env) == node


def test_other_ranks_on_rank_0s_node_log_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    tracker = Tracker(config(tmp_path, system_metrics=True), active=False, run_root=tmp_path)
    tracker.follow_node_metrics("some-run-id")
    assert tracker._node_metrics is None


def test_multipart_uploads_only_for_servers_and_never_over_the_user(monkeypatch) -> None:
    key = "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"
    monkeypatch.delenv(key, raising=False)
    with multipart_uploads("http://127.0.0.1:5000"):
        assert os.environ[key] == "true"
    assert key not in os.environ
    with multipart_uploads("sqlite:///x.db"):
        assert key not in os.environ
    monkeypatch.setenv(key, "false")
    with multipart_uploads("https://mlflow.example"):
        assert os.environ[key] == "false"


@pytest.mark.parametrize(
    ("setting", "max_mb", "logged"),
    [("auto", 256, True), ("auto", 0.001, False), ("true", 0.001, True), ("false", 256, False)],
)
def test_checkpoint_artifact_auto_follows_the_checkpoint_size(setting, max_mb, logged) -> None:
    cfg = load_config(None, [f"mlflow.log_checkpoint={setting}", f"mlflow.log_checkpoint_max_mb={max_mb}"])
    snapshot = {"model": {"w": torch.zeros(1000)}, "optimizer": {"state": {0: {"m": torch.zeros(1000)}}}}
    assert should_log_checkpoint(cfg, snapshot) is logged


def test_order_history_file_holds_plain_arrays_only(tmp_path: Path) -> None:
    history = OrderHistory()
    history.record(1, [torch.tensor([1.0, 0.0])])
    history.record(3, [torch.tensor([0.0, 1.0])])
    history.record(3, [torch.tensor([0.5, 0.5])])  # the same step again replaces it
    path = tmp_path / "o.npz"
    path.write_bytes(history.to_npz())
    again = OrderHistory.from_npz(path)
    assert again.steps == [1, 3]
    np.testing.assert_array_equal(again.matrices()[0], [[1.0, 0.5], [0.0, 0.5]])
    with pytest.raises(ValueError, match="a different model"):
        again.record(5, [torch.zeros(3)])
    np.savez(tmp_path / "bad.npz", steps=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        OrderHistory.from_npz(tmp_path / "bad.npz")
