"""The training pipeline against real services: local Ray (2 CPU workers, gloo), a real
``mlflow server`` with a sqlite backend, and real shards of the built-in sample set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from flows import build_flow
from pipeline.checkpoint import read_checkpoint
from pipeline.config import TrainConfig, checkpoint_root, load_config, resolve
from pipeline.data import make_eval_loader
from pipeline.faults import Faults
from pipeline.loop import MODEL_VERSION_TAG
from pipeline.ray_adapter import fit_with_ray
from pipeline.registry import BPD_TAG, load_flow_model
from pipeline.tracking import RUN_NAME_TAG

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN_KEYS = ("train/bits_per_dim", "train/regularizer", "train/grad_norm", "train/images_per_s", "train/lr")


def tiny(tmp_path: Path, shards: Path, server, *overrides: str) -> TrainConfig:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            f"data.root={shards}",
            f"run.root={tmp_path / 'runs'}",
            f"mlflow.tracking_uri={server.uri}",
            "ray.num_workers=2",
            "ray.use_gpu=false",
            "run.progress_bar=false",
            *overrides,
        ],
    )
    return resolve(cfg, cwd=tmp_path)


def test_two_worker_run_tracks_registers_and_reloads(tmp_path, tiny_shards, mlflow_server, ray_local):
    cfg = tiny(tmp_path, tiny_shards, mlflow_server, "run.name=two-workers",
               "mlflow.registered_model=tiny-two-workers")  # fmt: skip
    result = fit_with_ray(cfg)
    assert result.step == cfg.total_steps == 8

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.world_size"] == "2"
    assert run.data.params["ray.num_workers"] == "2"
    for key in (*TRAIN_KEYS, "test/bits_per_dim"):
        assert key in run.data.metrics, key
    assert run.data.metrics["test/bits_per_dim"] == pytest.approx(result.test_bits_per_dim)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(p.endswith("step000000008_T0.7.png") for p in samples), samples
    assert any(p.endswith("step000000008_T1.png") for p in samples), samples
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    name = cfg.mlflow.registered_model
    newest = client.get_model_version_by_alias(name, cfg.mlflow.newest_alias)
    assert newest.run_id == run.info.run_id
    assert str(newest.version) == run.data.tags[MODEL_VERSION_TAG] == result.model_version  # via Ray
    assert result.diagnostics and all(f"diag/{k}" in run.data.metrics for k in result.diagnostics)
    assert float(newest.tags[BPD_TAG]) == pytest.approx(result.test_bits_per_dim)
    assert client.get_model_version_by_alias(name, cfg.mlflow.champion_alias).version == newest.version

    # The registered model is the checkpoint's model: same bits/dim on the same images, same samples.
    loaded = load_flow_model(f"models:/{name}@{cfg.mlflow.newest_alias}", tracking_uri=mlflow_server.uri)
    reference = build_flow(cfg.model)
    reference.load_state_dict(read_checkpoint(result.checkpoint_path)["model"])
    reference.eval()
    images = next(iter(make_eval_loader(cfg.data, rank=0, world_size=1)))
    got = loaded.bits_per_dim(images, generator=torch.Generator().manual_seed(3))
    want = reference.bits_per_dim(images, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    drawn = loaded.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.uint8 and drawn.shape == (4, 3, 32, 32)
    assert torch.equal(
        drawn, reference.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(1))
    )


def test_worker_failure_resumes_the_same_run_and_a_rerun_extends_it(
    tmp_path, tiny_shards, mlflow_server, ray_local
):
    cfg = tiny(tmp_path, tiny_shards, mlflow_server, "run.name=resume", "run.log_every=1",
               "ray.max_failures=1", "mlflow.registered_model=tiny-resume")  # fmt: skip
    result = fit_with_ray(cfg, faults=Faults(fail_at_step=6))  # in rank 1, before step 6
    assert result.step == 8
    run_dir = checkpoint_root(cfg) / cfg.run.name
    assert (run_dir / ".fault-injected-step6").exists()  # the fault did fire in rank 1

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["pipeline.resumed_from_step"] == "4"  # restarted from the step-4 checkpoint
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/bits_per_dim")]
    assert sorted(steps) == list(range(1, 9)), steps  # no step logged twice
    runs = client.search_runs([run.info.experiment_id], f"tags.`{RUN_NAME_TAG}` = 'resume'")
    assert [r.info.run_id for r in runs] == [run.info.run_id]

    # Re-submitting the same run name with more epochs continues from the final checkpoint.
    longer = tiny(tmp_path, tiny_shards, mlflow_server, "run.name=resume", "run.log_every=1", "run.epochs=3",
                  "mlflow.registered_model=tiny-resume")  # fmt: skip
    extended = fit_with_ray(longer)
    assert extended.step == 12 and extended.mlflow_run_id == run.info.run_id
    assert extended.model_version == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/bits_per_dim")]
    assert sorted(steps) == list(range(1, 13)), steps
    versions = client.search_model_versions("name = 'tiny-resume'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_model_version_by_alias("tiny-resume", "newest").version == "2"


class RecordReports(ray.train.UserCallback):
    """Appends rank 0's metrics of every report the Train controller receives to a JSON-lines file
    (the controller is another process), as Tune's TuneReportCallback would forward them."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, str | int)}) + "\n")


def test_a_run_restarted_after_its_final_checkpoint_reports_its_result_again(
    tmp_path, tiny_shards, mlflow_server, ray_local
):
    """A restart that finds the final checkpoint (a Tune search cut off just after a trial wrote it,
    before the driver saw its report) trains nothing and reports the same final result again: the
    driver (Tune) gets the step and the MLflow run id, not silence."""
    cfg = tiny(tmp_path, tiny_shards, mlflow_server, "run.name=restarted-at-the-end", "ray.num_workers=1",
               "mlflow.register=false", "mlflow.log_model=false")  # fmt: skip
    first = fit_with_ray(cfg)
    reports = tmp_path / "reports.jsonl"
    again = fit_with_ray(cfg, callbacks=[RecordReports(reports)])
    assert again.step == first.step == cfg.total_steps
    (report,) = [json.loads(line) for line in reports.read_text().splitlines()]
    assert report["step"] == cfg.total_steps and report["mlflow_run_id"] == first.mlflow_run_id
