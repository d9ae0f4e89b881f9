"""Conditional affine coupling: an affine coupling whose network also sees a context tensor.

This is the coupling of DenseFlow's variational dequantizer (matejgrcic/DenseFlow, identical in the EIW
authors' copy: experiments/image/model/dequantization.py ``ConditionalCoupling`` over
denseflow/transforms/bijections/conditional/coupling/coupling.py). With ``x = [x1, x2]`` split in
channel halves and ``h = DenseNet(cat(x1, context))``:

    log_scale = 2 tanh(h[:, 0::2] / 2),  shift = h[:, 1::2]   (their ElementwiseParams2d(2, 'sequential'))
    y = [x1, shift + exp(log_scale) * x2],  log_det = sum(log_scale)

The soft clamp bounds each log-scale to (-2, 2). The DenseNet's last conv is zero-initialised, so the
coupling starts as the identity whatever the context.

The context is a keyword argument of ``forward`` and ``inverse`` (the bijection contract otherwise):
it has the spatial size of ``x`` and is not transformed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.bijection import Bijection, full_precision, sum_per_sample
from flows.denseflow.dense_net import DenseNet


class ConditionalAffineCoupling(Bijection):
    """x (B, C, H, W), context (B, C_ctx, H, W) -> y (B, C, H, W), log_det (B,). C must be even."""

    def __init__(
        self, num_channels: int, context_channels: int, *, mid_channels: int, depth: int, growth: int,
    ) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"ConditionalAffineCoupling needs an even channel count, got {num_channels}")
        self.half = num_channels // 2
        # Their DenseNet(in: half + context, out: C, num_blocks=1, gated, zero_init=True).
        self.net = DenseNet(
            self.half + context_channels, num_channels, mid_channels=mid_channels, depth=depth,
            growth=growth,
        )

    def _scale_shift(self, x1: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        if context.shape[0] != x1.shape[0] or context.shape[2:] != x1.shape[2:]:
            raise ValueError(
                f"context {tuple(context.shape)} must match the input's batch and spatial size "
                f"{(x1.shape[0], *x1.shape[2:])}"
            )
        h = full_precision(self.net(torch.cat([x1, context.to(x1.dtype)], dim=1)))  # float32 under autocast
        # 'sequential' parameter layout: channel 2k is the scale of x2's channel k, 2k + 1 its shift.
        log_scale = 2.0 * torch.tanh(h[:, 0::2] / 2.0)
        return log_scale, h[:, 1::2]

    def forward(self, x: Tensor, *, context: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        log_scale, shift = self._scale_shift(x1, context)
        y2 = shift + torch.exp(log_scale) * full_precision(x2)
        return torch.cat([x1, y2], dim=1), sum_per_sample(log_scale)

    def inverse(self, y: Tensor, *, context: Tensor) -> Tensor:
        y1, y2 = y[:, : self.half], y[:, self.half :]
        log_scale, shift = self._scale_shift(y1, context)
        x2 = (y2 - shift) * torch.exp(-log_scale)
        return torch.cat([y1, x2], dim=1)
