"""The DenseFlow base through the same pipeline as Glow: local Ray with 2 workers (gloo), a real
``mlflow server``, real shards; every split strategy trains, evaluates (ELBO and IWBO), registers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, resolve
from pipeline.data import make_eval_loader
from pipeline.ray_adapter import fit_with_ray
from pipeline.registry import load_flow_model

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("strategy", ["static", "eiw", "lcma"])
def test_denseflow_trains_under_ray_with_each_split_strategy(
    strategy, tmp_path, tiny_shards, mlflow_server, ray_local
):
    name = f"denseflow-{strategy}"
    cfg = resolve(
        load_config(
            CONFIGS / "tiny_denseflow.yaml",
            [
                f"data.root={tiny_shards}",
                f"run.root={tmp_path / 'runs'}",
                f"mlflow.tracking_uri={mlflow_server.uri}",
                f"mlflow.registered_model=tiny-{name}",
                f"run.name={name}",
                f"model.split.strategy={strategy}",
                *(["model.split.warmup_steps=1"] if strategy == "lcma" else []),
                "data.batches_per_epoch=2",
                "run.epochs=1",
                "run.iwbo_samples=2",
                "ray.num_workers=2",
                "ray.use_gpu=false",
                "run.progress_bar=false",
            ],
        ),
        cwd=tmp_path,
    )
    result = fit_with_ray(cfg)
    assert result.step == cfg.total_steps == 2

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.world_size"] == "2"
    assert run.data.params["model.base"] == "denseflow"
    metrics = run.data.metrics
    assert metrics["test/bits_per_dim"] == pytest.approx(result.test_bits_per_dim)
    # The IWBO (K = 2) of the same images: a finite bound near the ELBO.
    assert abs(metrics["test/iwbo_bits_per_dim"] - metrics["test/bits_per_dim"]) < 0.5
    if strategy == "eiw":
        assert metrics["train/regularizer"] != 0.0
    if strategy == "lcma":
        assert metrics["diag/split0/frozen"] == 1.0

    loaded = load_flow_model(f"models:/tiny-{name}@{cfg.mlflow.newest_alias}", tracking_uri=mlflow_server.uri)
    assert loaded.cfg.base == "denseflow" and loaded.cfg.split.strategy == strategy
    images = next(iter(make_eval_loader(cfg.data, rank=0, world_size=1)))[:4]
    with torch.no_grad():
        x = loaded.dequantize(images)
        zs, _ = loaded.encode(x)
        torch.testing.assert_close(loaded.decode(zs), x, atol=1e-4, rtol=0)
    assert loaded.sample(2, temperature=0.7).shape == (2, *cfg.model.image_shape)
