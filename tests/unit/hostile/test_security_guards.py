"""The issue-21 checks are not too strict: valid inputs still pass them (these pass before and after;
the hostile inputs themselves are in tests/unit/hostile/test_*.py, each of which fails without the
checks)."""

from __future__ import annotations

import json

from pipeline.config import TrainConfig, load_config
from tests.unit.hostile.test_serving import batch, post


def test_real_numbers_and_true_booleans_still_load():
    overrides = ["model.n_bits=5", "optim.lr=3e-4", "ray.cpus_per_worker=2", "mlflow.register=no"]
    cfg = load_config(None, overrides)
    assert isinstance(cfg, TrainConfig) and cfg.model.n_bits == 5 and cfg.optim.lr == 3e-4
    assert cfg.ray.cpus_per_worker == 2.0 and cfg.mlflow.register is False


def test_uint8_integers_are_scored(served):
    status, text = post(served, batch())
    assert status == 200, text
    assert len(json.loads(text)["predictions"]) == 2


def test_intact_shards_read_in_full(dataset):
    from data_prep.loading import eval_loader

    manifest = json.loads((dataset / "test" / "manifest.json").read_text())
    batches = list(eval_loader(dataset / "test", batch_size=16, rank=0, world_size=1))
    assert sum(len(b) for b in batches) == manifest["total"]
