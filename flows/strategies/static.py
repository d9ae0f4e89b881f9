"""Glow's static split: the first half of the channels continues, the second half is factored out.

``swap_halves`` keeps the second half and factors out the first: the control that tells "a better
ranking" from "the other half" in the split ablation (LCMA-low after warm-up may keep exactly the
half static factors out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from flows.strategies.base import SplitStrategy, StrategyConfig


@dataclass(kw_only=True)
class StaticConfig(StrategyConfig):
    """``static`` (Glow) or ``static_swapped`` (the halves exchanged: a control); no knobs."""

    strategy: Literal["static", "static_swapped"] = "static"

    NAMES: ClassVar[tuple[str, ...]] = ("static", "static_swapped")

    def build(self, num_channels: int, height: int, width: int) -> SplitStrategy:
        return StaticSplit(swap_halves=self.strategy == "static_swapped")


class StaticSplit(SplitStrategy):
    """The identity permutation, or (``swap_halves``) the two halves exchanged."""

    def __init__(self, *, swap_halves: bool = False) -> None:
        super().__init__()
        self.swap_halves = swap_halves

    def permute(self, x: Tensor) -> Tensor:
        if not self.swap_halves:
            return x
        return torch.roll(x, shifts=x.shape[1] // 2, dims=1)

    def unpermute(self, y: Tensor) -> Tensor:
        if not self.swap_halves:
            return y
        return torch.roll(y, shifts=-(y.shape[1] // 2), dims=1)

    def channel_order(self, num_channels: int) -> Tensor:
        return self.permute(torch.arange(num_channels).view(1, -1)).view(-1)

    def diagnostics(self) -> dict[str, float]:
        return {"static_overlap": 0.0 if self.swap_halves else 1.0}
