"""DenseFlow's invertible dense block with cross-unit coupling (their ``InvertibleDenseBlock``).

A block is a chain of units u_0 .. u_{n-1}; unit i works on C + i * growth_rate channels. Before every
unit after the first, ``growth_rate`` channels of noise are appended (Grcic et al. 2021, sec. 3):

    eta_i = mu_i(g_i) + exp(log_scale_i(g_i)) * eps_i,   eps_i ~ N(0, I)
    h_i   = u_i(cat(h_{i-1}, eta_i))

with g_i = cat(x, h_0, ..., h_{i-2}): the block input and every earlier unit's output except the one
being augmented (their ``g_inputs`` bookkeeping; e.g. unit 2 sees x and h_0). mu and log_scale come
from ``CrossUnitNoise`` (their ``_BNReLUConv``, which has no BatchNorm): conv3x3 -> ReLU -> zero-init
conv1x1, log_scale = 2 tanh(raw / 2).

This is variational augmentation: with eta ~ q(eta | x) the flow models the joint p(x, eta), and

    log p(x) >= E_q [ log p(x, eta) - log q(eta | x) ].

``forward`` returns (h_{n-1}, log_det) with log_det = sum of the units' log-dets - log q(eta | x) for
the eta it drew (their ``- log N(eps) + sum log_scale`` term), so ``FlowModel.log_prob`` is a
one-sample estimate of the bound. ``inverse`` drops the noise channels after each unit, as theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.bijection import Bijection, Compose, full_precision, sum_per_sample
from flows.denseflow.coupling import dense_flow_layer

# make_noise(unit index, mu, log_scale) -> (eta, eps): draws (or reads) the noise of one unit.
NoiseMaker = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


class CrossUnitNoise(nn.Module):
    """g (B, C_g, H, W) -> (mu, log_scale), each (B, growth_rate, H, W); zero at init (eta = eps)."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 4 * in_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * in_channels, 2 * growth_rate, kernel_size=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, g: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = full_precision(self.net(g)).chunk(2, dim=1)  # log q(eta | x) in float32 under autocast
        return mu, 2.0 * torch.tanh(raw / 2.0)


def standard_normal_log_density(eps: Tensor) -> Tensor:
    """log N(eps; 0, I) per sample, (B, ...) -> (B,)."""
    return sum_per_sample(-0.5 * eps * eps) - 0.5 * eps[0].numel() * math.log(2.0 * math.pi)


class InvertibleDenseBlock(Bijection):
    """x (B, C, H, W) -> (B, C + (num_units - 1) * growth_rate, H, W); see the module doc."""

    def __init__(
        self,
        in_channels: int,
        *,
        num_units: int,
        num_layers: int,
        mid_channels: int,
        growth_rate: int,
        net_depth: int,
        net_growth: int,
        num_landmarks: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.units = nn.ModuleList()
        self.noise_nets = nn.ModuleList()
        conditioning_channels = in_channels  # g_1 = x
        for i in range(num_units):
            channels = in_channels + i * growth_rate
            if i > 0:
                self.noise_nets.append(CrossUnitNoise(conditioning_channels, growth_rate))
                conditioning_channels += channels - growth_rate  # g_{i+1} gains h_{i-1}
            layers = [
                dense_flow_layer(
                    channels,
                    mid_channels=mid_channels,
                    depth=net_depth,
                    growth=net_growth,
                    num_landmarks=num_landmarks,
                    generator=generator,
                )
                for _ in range(num_layers)
            ]
            self.units.append(Compose(*layers))

    @property
    def out_channels(self) -> int:
        return self.in_channels + (len(self.units) - 1) * self.growth_rate

    def run(self, x: Tensor, make_noise: NoiseMaker) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (h, units' summed log-det (B,), log q(eta | x) (B,)), the noise from ``make_noise``."""
        log_det = x.new_zeros(x.shape[0])
        log_q = x.new_zeros(x.shape[0])
        conditioning = [x]
        h = x
        for i, unit in enumerate(self.units):
            if i > 0:
                mu, log_scale = self.noise_nets[i - 1](torch.cat(conditioning, dim=1))
                eta, eps = make_noise(i, mu, log_scale)
                # log N(eta; mu, exp(log_scale)) = log N(eps; 0, 1) - sum log_scale.
                log_q = log_q + standard_normal_log_density(eps) - sum_per_sample(log_scale)
                conditioning.append(h)
                h = torch.cat([h, eta], dim=1)
            h, unit_log_det = unit(h)
            log_det = log_det + unit_log_det
        return h, log_det, log_q

    @staticmethod
    def _sample_noise(i: int, mu: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
        # Drawn contiguous, not ``randn_like(mu)``: randn_like keeps mu's memory format, and mu (a
        # channel slice of a conv output) is channels-last when inductor or ``gpu.channels_last``
        # lays the conv out NHWC; the same draws would then land at permuted (c, h, w) positions and
        # compiled and eager runs of one seed would see different noise (issue 20).
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(log_scale) * eps, eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, log_det, log_q = self.run(x, self._sample_noise)
        return h, log_det - log_q

    def inverse_with_noise(self, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """y -> (x, [eta_1, ..., eta_{n-1}]): the exact inverse, keeping the noise it drops."""
        noise: list[Tensor] = []
        for i in reversed(range(len(self.units))):
            y = self.units[i].inverse(y)
            if i > 0:
                noise.insert(0, y[:, -self.growth_rate :])
                y = y[:, : -self.growth_rate]
        return y, noise

    def inverse(self, y: Tensor) -> Tensor:
        return self.inverse_with_noise(y)[0]
