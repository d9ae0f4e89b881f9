"""Affine and additive coupling layers (Glow sec. 3.3; RealNVP, Dinh et al. 2017).

The input is cut along channels into x_a (the first C//2) and x_b (the rest). A conv net sees
x_a and produces the transform of x_b; x_a passes through unchanged, so the Jacobian is triangular.

Numerical choices, from the official Glow code (openai/glow, model.py):
- scale = sigmoid(h + 2): starts near 0.88, bounded in (0, 1), so no step can blow activations up;
  exp(h) is what makes early Glow training NaN.
- The net's last conv is zero-initialised (with a learned per-channel log-scale factor of 3), so each
  coupling starts as (nearly) the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.bijection import Bijection, full_precision, sum_per_sample


class ZeroConv2d(nn.Module):
    """3x3 conv initialised to output zero; output scaled by exp(3 * logs) as in Glow's conv2d_zeros."""

    def __init__(self, in_channels: int, out_channels: int, *, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        # Folding the output scale into weight and bias saves keeping the conv output for backward.
        scale = torch.exp(self.logs * self.logscale_factor).reshape(-1)
        return F.conv2d(x, self.conv.weight * scale[:, None, None, None], self.conv.bias * scale, padding=1)


class CouplingNet(nn.Module):
    """Glow's NN(): conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-init conv3x3.

    (B, in_channels, H, W) -> (B, out_channels, H, W). Glow puts ActNorm after the first two convs; we
    use conv biases instead (as normflows does): one fewer data-dependent init to synchronise and
    measurably faster per step, with the zero-init output keeping the start stable.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1)
        self.conv_out = ZeroConv2d(hidden_channels, out_channels)
        nn.init.normal_(self.conv_in.weight, std=0.05)
        nn.init.zeros_(self.conv_in.bias)
        nn.init.normal_(self.conv_mid.weight, std=0.05)
        nn.init.zeros_(self.conv_mid.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv_in(x))
        h = F.relu(self.conv_mid(h))
        return self.conv_out(h)


class AffineCoupling(Bijection):
    """y_a = x_a, y_b = (x_b + shift(x_a)) * sigmoid(raw_scale(x_a) + 2).

    x: (B, C, H, W) with C >= 2; x_a = x[:, :C//2], x_b = x[:, C//2:].
    log_det = sum log sigmoid(raw_scale + 2).
    """

    def __init__(self, num_channels: int, hidden_channels: int) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"AffineCoupling needs at least 2 channels, got num_channels={num_channels}")
        self.num_a = num_channels // 2
        num_b = num_channels - self.num_a
        self.net = CouplingNet(self.num_a, 2 * num_b, hidden_channels)

    def _shift_and_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = full_precision(self.net(x_a))  # scales and log-det in float32 under autocast
        # Interleaved channels, as in Glow's h[:, 0::2] / h[:, 1::2].
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.num_a], x[:, self.num_a :]
        shift, scale = self._shift_and_scale(x_a)
        x_b = full_precision(x_b)
        # x_b * scale + shift * scale rather than (x_b + shift) * scale: autograd then keeps only
        # `scale` alive (x_b and shift are views of live tensors), one activation fewer per step.
        y_b = x_b * scale + shift * scale
        # log(sigmoid) as in Glow's code; it only underflows for pre-activations below about -100,
        # which the trainer's non-finite-loss guard catches.
        log_det = sum_per_sample(torch.log(scale))
        return torch.cat([x_a, y_b], dim=1), log_det

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.num_a], y[:, self.num_a :]
        shift, scale = self._shift_and_scale(y_a)
        x_b = y_b / scale - shift
        return torch.cat([y_a, x_b], dim=1)


class AdditiveCoupling(Bijection):
    """y_a = x_a, y_b = x_b + shift(x_a); volume preserving (NICE), log_det = 0."""

    def __init__(self, num_channels: int, hidden_channels: int) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"AdditiveCoupling needs at least 2 channels, got num_channels={num_channels}")
        self.num_a = num_channels // 2
        self.net = CouplingNet(self.num_a, num_channels - self.num_a, hidden_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.num_a], x[:, self.num_a :]
        y_b = full_precision(x_b) + full_precision(self.net(x_a))
        return torch.cat([x_a, y_b], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.num_a], y[:, self.num_a :]
        return torch.cat([y_a, y_b - self.net(y_a)], dim=1)
