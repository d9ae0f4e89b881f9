"""Resuming under Ray Train when the checkpoint Ray restores is unreadable: real local Ray, a real
``mlflow server``, real shards. The worker falls back to the newest intact checkpoint, the step it
reaches again is reported under a name Ray does not hold yet, and Ray's retention afterwards leaves a
run folder that resumes again."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import STATE_FILE, checkpoint_name, list_checkpoints, read_checkpoint
from pipeline.config import TrainConfig, checkpoint_root, load_config, resolve
from pipeline.ray_adapter import fit_with_ray
from pipeline.train_state import RESUME_CHANGES_TAG, RESUME_FALLBACK_TAG

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny(tmp_path: Path, shards: Path, server, *overrides: str) -> TrainConfig:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            f"data.root={shards}",
            f"run.root={tmp_path / 'runs'}",
            f"mlflow.tracking_uri={server.uri}",
            "ray.use_gpu=false",
            "run.progress_bar=false",
            "run.name=ray-fallback",
            "run.checkpoint_every=2",
            "run.keep_checkpoints=3",
            "mlflow.log_model=false",
            "mlflow.register=false",
            "mlflow.log_checkpoint=false",
            *overrides,
        ],
    )
    return resolve(cfg, cwd=tmp_path)


def test_an_unreadable_checkpoint_from_ray_falls_back_and_the_run_resumes_again(
    tmp_path, tiny_shards, mlflow_server, ray_local
):
    cfg = tiny(tmp_path, tiny_shards, mlflow_server)
    first = fit_with_ray(cfg)
    run_dir = checkpoint_root(cfg) / cfg.run.name
    assert first.step == 8
    latest = run_dir / checkpoint_name(8) / STATE_FILE
    latest.write_bytes(latest.read_bytes()[:500])  # Ray restores this one next

    longer = tiny(tmp_path, tiny_shards, mlflow_server, "run.epochs=3")
    extended = fit_with_ray(longer)
    assert extended.step == 12 and extended.mlflow_run_id == first.mlflow_run_id
    run = MlflowClient(mlflow_server.uri).get_run(first.mlflow_run_id)
    assert run.data.tags["pipeline.resumed_from_step"] == "6"
    assert str(latest) in run.data.tags[RESUME_FALLBACK_TAG]
    assert "run.epochs: 2 -> 3" in run.data.tags[RESUME_CHANGES_TAG]
    # Step 8 again: Ray held the unreadable checkpoint_..08, so the new one got another name, and
    # Ray's retention (keep 3) removed the old entry without taking the new one with it.
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == [f"{checkpoint_name(8)}-1", checkpoint_name(10), checkpoint_name(12)], names
    assert read_checkpoint(run_dir / f"{checkpoint_name(8)}-1")["step"] == 8

    fit_with_ray(longer)  # finished: Ray's own record of the run still matches the folder, so it starts
    assert [p.name for p in list_checkpoints(run_dir)] == names
