"""The DenseFlow recipes load, say what DenseFlow's published commands say, and run the global batch
their learning rate belongs to."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from tests.unit.pipeline.tiny_run import CONFIGS


@pytest.mark.parametrize(
    "name, k, gamma", [("imagenet64_denseflow", 200, 0.95), ("cifar10_denseflow", 1000, 0.9975)]
)
def test_recipe_is_denseflow_published_setting(name: str, k: int, gamma: float) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    model = cfg.model
    assert (model.base, model.dequantization, model.split_prior) == ("denseflow", "variational", "standard")
    assert model.denseflow.units == (6, 4, 1) and model.denseflow.layers == (5, 6, 20)
    assert model.denseflow.mid_channels == (48, 48, 48) and model.denseflow.growth_rate == 10
    assert (model.split.strategy, cfg.loss.sigma) == ("eiw", 1e-3)
    assert cfg.optim.name == "adamax" and cfg.optim.lr == 1e-3 and cfg.optim.warmup_steps == 5000
    assert cfg.optim.decay_per_epoch == gamma and cfg.run.iwbo_samples == k
    assert cfg.data.batch_size * cfg.ray.num_workers == cfg.optim.reference_batch


def test_denseflow_search_loads_and_its_trials_are_denseflow(monkeypatch) -> None:
    from tune.spec import load_spec
    from tune.trial import trial_config

    monkeypatch.chdir(CONFIGS.parent)  # base_config paths are relative to the repo root
    spec = load_spec(CONFIGS / "tune" / "imagenet64_denseflow.yaml")
    sigma = spec.space["loss.sigma"]
    assert (min(sigma.values), max(sigma.values)) == (1e-4, 1.0)
    cfg = trial_config(spec.base, {"loss.sigma": 0.01, "model.denseflow.growth_rate": 6}, "abc_00001")
    assert cfg.model.base == "denseflow" and cfg.model.denseflow.growth_rate == 6
    assert cfg.loss.sigma == 0.01 and cfg.run.iwbo_samples == 0
