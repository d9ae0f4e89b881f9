"""Split strategies, the factory that builds one from a ``SplitConfig``, and the training-step hook.

The training loop drives the strategies with one call per optimizer step (see ``advance``) and adds
the Shuffle regulariser to its loss::

    flows.strategies.advance(model, step)          # step = optimizer steps completed so far
    loss = model.bits_per_dim(x).mean() + cfg.split.sigma * model.regularization()
"""

from __future__ import annotations

from torch import nn

from flows.config import SPLIT_STRATEGIES, SplitConfig
from flows.strategies.base import SplitStrategy
from flows.strategies.eiw import EIWShuffleSplit
from flows.strategies.lcma import LCMASplit
from flows.strategies.static import StaticSplit

STRATEGIES = SPLIT_STRATEGIES


def build_split_strategy(cfg: SplitConfig, *, num_channels: int, height: int, width: int) -> SplitStrategy:
    """One strategy instance for a split whose input is (num_channels, height, width)."""
    if cfg.strategy == "static":
        return StaticSplit()
    if cfg.strategy == "eiw":
        return EIWShuffleSplit(
            num_channels,
            regularizer=cfg.regularizer,
            freeze_after_steps=cfg.freeze_after_steps,
            se_reduction=cfg.se_reduction,
            generator_hidden=cfg.generator_hidden,
        )
    if cfg.strategy == "lcma":
        return LCMASplit(
            num_channels,
            height,
            width,
            warmup_steps=cfg.lcma_warmup_steps,
            factor_out=cfg.lcma_factor_out,
            momentum=cfg.lcma_momentum,
        )
    raise ValueError(f"split.strategy: unknown strategy {cfg.strategy!r}; choose one of {STRATEGIES}")


def advance(model: nn.Module, step: int) -> None:
    """Tell every split strategy in ``model`` how many optimizer steps are done; call once per step.

    Call it before each training step's forward pass with ``step`` = the number of optimizer steps
    completed so far (0 before the first), on every rank, and again after resuming from a checkpoint
    (frozen permutations live in buffers and come back with the state_dict; this call re-attaches
    LCMA's measurement to its level). It is cheap and idempotent for a given step. It
    - attaches each LCMA split to the level whose output it receives (so training forwards measure
      contributions), and freezes its order once ``step >= lcma_warmup_steps``;
    - freezes each EIW Shuffle permutation once ``step >= freeze_after_steps`` (if set).
    ``model`` is a FlowModel or a wrapper holding one as ``.module`` (DDP). Under DDP keep the default
    ``broadcast_buffers=True``: every rank then uses rank 0's LCMA statistics and order.
    """
    from flows.model import FlowModel  # the model imports this package: import late

    if step < 0:
        raise ValueError(f"advance: step must be >= 0, got {step}")
    flow = getattr(model, "module", model)
    if not isinstance(flow, FlowModel):
        raise ValueError(
            f"advance: expected a FlowModel (or a DDP wrapper of one), got {type(model).__name__}"
        )
    for level, split in zip(flow.levels, flow.splits, strict=False):
        strategy = split.strategy
        if isinstance(strategy, LCMASplit):
            strategy.bind(level)
        if isinstance(strategy, EIWShuffleSplit | LCMASplit):
            strategy.advance(step)


__all__ = [
    "STRATEGIES",
    "EIWShuffleSplit",
    "LCMASplit",
    "SplitStrategy",
    "StaticSplit",
    "advance",
    "build_split_strategy",
]
