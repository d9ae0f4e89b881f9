"""optim.schedule: ``constant_after_warmup`` is the rate DenseFlow's stacked schedulers really train at;
``exponential`` compounds decay_per_epoch per epoch."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.step import lr_factor
from tests.unit.pipeline.test_lr_scaling import CONFIGS, config


class _TheirLinearWarmup(torch.optim.lr_scheduler.LRScheduler):
    """DenseFlow's ``LinearWarmupScheduler`` (denseflow/optim/schedulers/linear_warmup.py): absolute."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_epoch: int) -> None:
        self.total_epoch = total_epoch
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * min(1, self.last_epoch / self.total_epoch) for base in self.base_lrs]


def _their_rates(lr: float, warmup: int, gamma: float, per_epoch: int, epochs: int) -> list[float]:
    """The lr of every optimizer step of their loop: scheduler_iter.step() after each step,
    scheduler_epoch.step() after each epoch
    (experiments/image/experiment/baseline_flow.py, train_fn)."""
    optimizer = torch.optim.Adamax([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    per_iter = _TheirLinearWarmup(optimizer, warmup)
    per_epoch_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    rates = []
    for _ in range(epochs):
        for _ in range(per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            per_iter.step()
        per_epoch_scheduler.step()
    return rates


def test_constant_after_warmup_matches_their_effective_rate():
    warmup, per_epoch, epochs, gamma = 6, 4, 5, 0.5
    cfg = config(
        "optim.schedule=constant_after_warmup", f"optim.warmup_steps={warmup}",
        f"data.batches_per_epoch={per_epoch}", f"optim.decay_per_epoch={gamma}",
    )
    theirs = _their_rates(1e-3, warmup, gamma, per_epoch, epochs)
    factor = lr_factor(cfg)
    ours = [1e-3 * factor(step) for step in range(per_epoch * epochs)]
    # After warm-up: equal on every step, 1e-3 except each epoch's first step (gamma once, never
    # compounded). During warm-up ours is one step ahead (their first step runs at lr 0).
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12)
    assert theirs[per_epoch * (epochs - 1)] == pytest.approx(gamma * 1e-3)
    assert theirs[-1] == pytest.approx(1e-3)
    ramp_steps = [s for s in range(warmup) if s % per_epoch and (s + 1) % per_epoch]
    assert [ours[s] for s in ramp_steps] == pytest.approx([theirs[s + 1] for s in ramp_steps], rel=1e-12)


def test_exponential_compounds_per_epoch():
    cfg = config("optim.warmup_steps=2", "data.batches_per_epoch=3", "optim.decay_per_epoch=0.9")
    assert cfg.optim.schedule == "exponential"  # the default: existing configs keep their schedule
    factor = lr_factor(cfg)
    assert [factor(s) for s in range(9)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.9, 0.9, 0.9, 0.81, 0.81, 0.81]
    )


@pytest.mark.parametrize("name", ["imagenet64_denseflow", "cifar10_denseflow"])
def test_denseflow_recipes_train_at_the_authors_effective_rate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.optim.schedule == "constant_after_warmup"
    factor = lr_factor(cfg)
    last = cfg.total_steps - 1
    per_epoch = cfg.data.batches_per_epoch
    epoch_start = -(-cfg.optim.warmup_steps // per_epoch) * per_epoch  # the first after warm-up
    assert factor(last) == 1.0 and factor(epoch_start) == cfg.optim.decay_per_epoch
    assert factor(epoch_start + 1) == 1.0


def test_unknown_schedule_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        config("optim.schedule=cosine")
