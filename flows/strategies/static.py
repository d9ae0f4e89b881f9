"""Glow's static split: the first half of the channels continues, the second half is factored out."""

from __future__ import annotations

from torch import Tensor

from flows.strategies.base import SplitStrategy


class StaticSplit(SplitStrategy):
    """The identity permutation."""

    def permute(self, x: Tensor) -> Tensor:
        return x

    def unpermute(self, y: Tensor) -> Tensor:
        return y
