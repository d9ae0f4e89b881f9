"""The learning rate against the recipe's global batch: optim.reference_batch and optim.lr_scaling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pipeline.config import load_config
from pipeline.step import global_batch, learning_rate, make_optimizer
from tests.unit.pipeline.tiny_run import CONFIGS


def config(*overrides: str):
    return load_config(None, ["data.batch_size=32", "optim.lr=1e-3", *overrides])


def lr_of(cfg) -> float:
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "workers, scaling, expected",
    [
        (8, "none", 1e-3),
        (8, "linear", 1e-3),
        (8, "sqrt", 1e-3),
        (2, "none", 1e-3),
        (2, "linear", 1e-3 * 64 / 256),
        (2, "sqrt", 1e-3 * 0.5),
        (32, "linear", 1e-3 * 4),
        (32, "sqrt", 1e-3 * 2),
    ],
)
def test_rule_applied_to_the_optimizer(workers, scaling, expected):
    cfg = config("optim.reference_batch=256", f"optim.lr_scaling={scaling}", f"ray.num_workers={workers}")
    assert global_batch(cfg) == 32 * workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lr_of(cfg) == pytest.approx(expected, rel=1e-12)


def test_a_different_global_batch_warns_with_both_numbers():
    cfg = config("optim.reference_batch=256", "ray.num_workers=2")
    with pytest.warns(UserWarning, match=r"global batch 64 .*optim\.reference_batch 256.*keeps lr 0\.001"):
        assert learning_rate(cfg) == 1e-3
    scaled = config("optim.reference_batch=256", "ray.num_workers=2", "optim.lr_scaling=linear")
    with pytest.warns(UserWarning, match=r"global batch 64 .*256.*lr_scaling=linear: lr 0\.001 -> 0\.00025"):
        assert learning_rate(scaled) == pytest.approx(2.5e-4)


@pytest.mark.parametrize(
    "overrides", [["optim.reference_batch=256", "ray.num_workers=8"], ["ray.num_workers=2"]]
)
def test_no_warning_at_the_reference_batch_or_without_one(overrides):
    cfg = config(*overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert learning_rate(cfg) == 1e-3


def test_scaling_without_a_reference_batch_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"optim\.lr_scaling.*reference_batch"):
        config("optim.lr_scaling=sqrt")
    with pytest.raises(ValueError, match=r"optim\.lr_scaling"):
        config("optim.reference_batch=256", "optim.lr_scaling=cubic")
    with pytest.raises(ValueError, match=r"optim\.reference_batch"):
        config("optim.reference_batch=0")


def test_warm_up_and_decay_multiply_the_scaled_lr():
    from pipeline.step import lr_factor

    cfg = config(
        "optim.reference_batch=256", "optim.lr_scaling=sqrt", "ray.num_workers=2", "optim.warmup_steps=4"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-4 / 4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-4)


@pytest.mark.parametrize("name", ["imagenet64", "lsun_bedroom64"])
def test_paper_recipes_run_at_their_reference_batch(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.optim.reference_batch == global_batch(cfg) == 256
    assert cfg.optim.lr_scaling == "none"  # opt-in only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isclose(learning_rate(cfg), cfg.optim.lr)
