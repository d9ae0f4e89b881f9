"""The split-strategy abstraction: which channels continue and which are factored out at a split.

A strategy is a permutation of the (C, H, W) input of a split, applied before the fixed cut
"first half continues, second half is factored out". A permutation has log_det 0. It must be a
function of parameters and buffers only (never of the data being encoded), so ``decode`` and
``sample`` can rebuild it; data may influence it only through training (a regulariser, running
statistics frozen into buffers).

The training loop drives every strategy through the model, once per optimizer step, before the
step's forward pass (``FlowModel.advance(step)``): ``bind(level)`` hands the strategy the level whose
output it receives (LCMA measures it), then ``advance(step)`` applies its schedule (freezing, a
stabiliser). Both are no-ops here, so a new strategy only overrides what it uses.

Each strategy's configuration is a ``StrategyConfig`` subclass in the strategy's own file, registered
by name in flows/strategies/__init__.py; ``FlowConfig.split`` holds one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(kw_only=True)
class StrategyConfig:
    """The fields every strategy's config shares. A subclass narrows ``strategy`` to its name(s)
    (a ``Literal``: the pipeline validates ``model.split`` as a union discriminated by it), adds its
    knobs with their defaults (the only place they are written) and builds its module.

    strategy: the registered name that selected this config. (The regulariser's weight is not a model
        setting: the trainer's ``loss.sigma``, flows/objective.py.)
    """

    strategy: str

    NAMES: ClassVar[tuple[str, ...]] = ()  # the ``strategy`` values this class configures (a class attribute)

    def __post_init__(self) -> None:
        if self.strategy not in self.NAMES:
            raise ValueError(f"strategy: {self.strategy!r} is not configured by {type(self).__name__}")

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """This strategy's own fields (not the shared ``strategy``)."""
        return tuple(f.name for f in fields(cls) if f.name != "strategy")

    def knobs(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.knob_names()}

    def build(self, num_channels: int, height: int, width: int) -> SplitStrategy:  # pragma: no cover
        """One strategy module for a split whose input is (num_channels, height, width)."""
        raise NotImplementedError


class SplitStrategy(nn.Module):
    """Base class. x: (B, C, H, W) -> permuted x of the same shape."""

    def permute(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpermute(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def regularization(self) -> Tensor | None:
        """Regulariser of the last forward pass (scalar), or None when the strategy has none."""
        return None

    def bind(self, level: nn.Module) -> None:
        """Receive the level (a Compose of flow steps) whose output this split takes; idempotent."""

    def advance(self, step: int) -> None:
        """Called with the number of completed optimizer steps, before each training forward."""

    def diagnostics(self) -> dict[str, float]:
        """Scalars that describe the current order (logged by the trainer); none by default."""
        return {}

    def channel_order(self, num_channels: int) -> Tensor:
        """The current channel order, (C,) or per position (C, H, W): output channel i is input
        channel order[i]. The default (static) is the identity."""
        return torch.arange(num_channels)


class FreezableStrategy(SplitStrategy):
    """A strategy whose permutation can be fixed into buffers; ``frozen`` is saved with the state_dict.

    ``_is_frozen`` mirrors the ``frozen`` buffer in Python: reading a CUDA bool on every forward would
    synchronise the GPU. A load_state_dict hook keeps the mirror true after a resume.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("frozen", torch.tensor(False))
        self._is_frozen = False
        self.register_load_state_dict_post_hook(FreezableStrategy._sync_frozen_flag)

    @staticmethod
    def _sync_frozen_flag(module: FreezableStrategy, incompatible_keys: object) -> None:
        module._is_frozen = bool(module.frozen)

    def _mark_frozen(self) -> None:
        self.frozen.fill_(True)
        self._is_frozen = True


def kept_fraction_of_first_half(order: Tensor, num_keep: int) -> float:
    """Share of the kept entries that static (Glow) would also keep: order (C, ...) of channel indices
    along dim 0; static keeps channels 0..num_keep-1."""
    return (order[:num_keep] < num_keep).to(torch.float32).mean().item()


def kept_share(order: Tensor, num_keep: int) -> Tensor:
    """(C,) share of spatial positions at which each input channel continues (is not factored out):
    0 or 1 for a per-channel order (C,), fractions for a per-position order (C, H, W)."""
    num_channels = order.shape[0]
    kept = order[:num_keep].reshape(num_keep, -1)  # (num_keep, positions)
    counts = torch.zeros(num_channels, dtype=torch.float32, device=order.device)
    counts.index_add_(0, kept.reshape(-1), torch.ones(kept.numel(), device=order.device))
    return counts / kept.shape[1]
