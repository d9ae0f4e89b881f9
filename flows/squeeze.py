"""Squeeze: 2x2 space-to-channel reshuffle (RealNVP sec. 3.6), a permutation so log_det = 0."""

from __future__ import annotations

from torch import Tensor

from flows.bijection import Bijection


class Squeeze(Bijection):
    """(B, C, H, W) -> (B, 4C, H/2, W/2); output channel 4c + 2i + j holds x[c, 2h + i, 2w + j]."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {h}x{w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y: Tensor) -> Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        x = y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c, 2 * h, 2 * w)
