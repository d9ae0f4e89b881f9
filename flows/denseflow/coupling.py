"""DenseFlow's intra-unit layer: ActNorm -> 1x1 conv -> affine coupling -> channel switch.

The coupling follows their ``SingleAffineCoupling`` (experiments/image/model/affine_coupling.py):
x_a = the first ceil(C/2) channels conditions x_b = the rest through ``DenseNetMultihead`` (their
``DNMH``, zero-initialised output), whose 2 * |x_b| output channels are read "sequentially":
raw_scale = h[:, 0::2], shift = h[:, 1::2]. The log-scale is bounded, log_scale = 2 tanh(raw / 2),
so |log_scale| < 2 and a zero net is the identity; y_b = shift + exp(log_scale) * x_b.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flows.actnorm import ActNorm
from flows.bijection import Bijection, Compose, full_precision, sum_per_sample
from flows.denseflow.dense_net import DenseNetMultihead
from flows.invconv import InvConv1x1


class DenseAffineCoupling(Bijection):
    """x (B, C, H, W) -> cat(x_a, shift(x_a) + exp(log_scale(x_a)) * x_b), log_det = sum log_scale.

    ``checkpointing``: recompute the coupling net in backward instead of keeping its activations
    (their ``--checkpointing``; set by ``memory: checkpoint``).
    """

    def __init__(
        self, num_channels: int, *, mid_channels: int, depth: int, growth: int, num_landmarks: int
    ) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"DenseAffineCoupling needs at least 2 channels, got {num_channels}")
        num_b = num_channels // 2
        self.num_a = num_channels - num_b
        self.net = DenseNetMultihead(
            self.num_a,
            2 * num_b,
            mid_channels=mid_channels,
            depth=depth,
            growth=growth,
            num_landmarks=num_landmarks,
        )
        self.checkpointing = False

    def _shift_and_log_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            h = checkpoint(self.net, x_a, use_reentrant=False)
        else:
            h = self.net(x_a)
        h = full_precision(h)  # shift, scale and log-det in float32 under autocast
        return h[:, 1::2], 2.0 * torch.tanh(h[:, 0::2] / 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.num_a], x[:, self.num_a :]
        shift, log_scale = self._shift_and_log_scale(x_a)
        y_b = shift + torch.exp(log_scale) * full_precision(x_b)
        return torch.cat([x_a, y_b], dim=1), sum_per_sample(log_scale)

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.num_a], y[:, self.num_a :]
        shift, log_scale = self._shift_and_log_scale(y_a)
        return torch.cat([y_a, (y_b - shift) * torch.exp(-log_scale)], dim=1)


class ChannelSwitch(Bijection):
    """(x_1, x_2) -> (x_2, x_1) with x_1 the first ceil(C/2) channels (their ``SwitchChannels``).

    Their inverse re-chunks the output in halves, which is only right for even C; this one splits at
    floor(C/2) and is exact for every C."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        num_first = (x.shape[1] + 1) // 2
        return torch.cat([x[:, num_first:], x[:, :num_first]], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        num_second = y.shape[1] // 2
        return torch.cat([y[:, num_second:], y[:, :num_second]], dim=1)


def dense_flow_layer(
    num_channels: int,
    *,
    mid_channels: int,
    depth: int,
    growth: int,
    num_landmarks: int,
    generator: torch.Generator,
) -> Compose:
    """One layer of a unit: ActNorm -> invertible 1x1 conv -> affine coupling -> channel switch."""
    return Compose(
        ActNorm(num_channels),
        InvConv1x1(num_channels, generator=generator),
        DenseAffineCoupling(
            num_channels, mid_channels=mid_channels, depth=depth, growth=growth, num_landmarks=num_landmarks
        ),
        ChannelSwitch(),
    )
