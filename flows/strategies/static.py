"""Glow's static split: the first half of the channels continues, the second half is factored out.

``swap_halves`` keeps the second half and factors out the first: the control that tells "a better
ranking" from "the other half" in the split ablation (LCMA-low after warm-up may keep exactly the
half static factors out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.strategies.base import SplitStrategy


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
