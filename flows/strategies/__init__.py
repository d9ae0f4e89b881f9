"""Split strategies, registered by name: ``STRATEGY_BUILDERS[name](cfg, num_channels, height, width)``.

The training loop drives them through the model, once per optimizer step, and adds the Shuffle
regulariser to its loss::

    model.advance(step)                             # step = optimizer steps completed so far
    loss = training_loss(model.bits_per_dim(x), model.regularization(), sigma)  # flows/objective.py

A new strategy is a ``SplitStrategy`` subclass plus one entry here (and its name in
``flows.config.SPLIT_STRATEGIES``, which the config validates against).
"""

from __future__ import annotations

from collections.abc import Callable

from flows.config import SPLIT_STRATEGIES, SplitConfig
from flows.strategies.base import FreezableStrategy, SplitStrategy
from flows.strategies.eiw import EIWShuffleSplit
from flows.strategies.lcma import LCMASplit
from flows.strategies.static import StaticSplit

STRATEGIES = SPLIT_STRATEGIES

StrategyBuilder = Callable[[SplitConfig, int, int, int], SplitStrategy]


def _eiw(cfg: SplitConfig, num_channels: int, height: int, width: int) -> SplitStrategy:
    return EIWShuffleSplit(
        num_channels,
        regularizer=cfg.regularizer,
        generator=cfg.generator,
        generator_hidden=cfg.generator_hidden,
        se_reduction=cfg.se_reduction,
        se_activation=cfg.se_activation,
        se_input=cfg.se_input,
        se_detach=cfg.se_detach,
        se_bias=cfg.se_bias,
        freeze_after_steps=cfg.freeze_after_steps,
        stabilizer=cfg.stabilizer,
        ema_momentum=cfg.ema_momentum,
        hysteresis_margin=cfg.hysteresis_margin,
    )


def _lcma(cfg: SplitConfig, num_channels: int, height: int, width: int) -> SplitStrategy:
    return LCMASplit(
        num_channels,
        height,
        width,
        warmup_steps=cfg.lcma_warmup_steps,
        factor_out=cfg.lcma_factor_out,
        momentum=cfg.lcma_momentum,
    )


STRATEGY_BUILDERS: dict[str, StrategyBuilder] = {
    "static": lambda cfg, c, h, w: StaticSplit(),
    "static_swapped": lambda cfg, c, h, w: StaticSplit(swap_halves=True),
    "eiw": _eiw,
    "lcma": _lcma,
}
assert set(STRATEGY_BUILDERS) == set(SPLIT_STRATEGIES), "register every configurable strategy"


def build_split_strategy(cfg: SplitConfig, *, num_channels: int, height: int, width: int) -> SplitStrategy:
    """One strategy instance for a split whose input is (num_channels, height, width)."""
    builder = STRATEGY_BUILDERS.get(cfg.strategy)
    if builder is None:
        raise ValueError(f"split.strategy: unknown strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    return builder(cfg, num_channels, height, width)


__all__ = [
    "STRATEGIES",
    "STRATEGY_BUILDERS",
    "EIWShuffleSplit",
    "FreezableStrategy",
    "LCMASplit",
    "SplitStrategy",
    "StaticSplit",
    "build_split_strategy",
]
