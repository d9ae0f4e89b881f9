"""Split (Glow's split2d) as a bijection: permute, cut, and standardise the factored-out half.

Glow models the factored-out half x_out with a Gaussian whose mean and log-scale come from a
zero-initialised conv of the kept half: log p(x_out | x_keep) = log N(x_out; mu, exp(logs)).
We write that as the affine bijection z = (x_out - mu) * exp(-logs) (log_det = -sum logs) followed by
a standard normal prior on z. The density is identical, every latent the model returns is then
standard normal, sampling at temperature T is z = T * eps exactly as in Glow, and the split can be
checked by the same Jacobian harness as every other layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.bijection import Bijection, full_precision, sum_per_sample
from flows.coupling import ZeroConv2d
from flows.strategies.base import SplitStrategy

SPLIT_PRIORS = ("gaussian", "standard")


class Split(Bijection):
    """x: (B, C, H, W) -> y = cat(x_keep (B, C_keep, H, W), z (B, C - C_keep, H, W)).

    ``num_keep`` channels continue through the next level; the rest become a latent.
    """

    def __init__(self, num_channels: int, *, strategy: SplitStrategy, prior: str = "gaussian") -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"Split needs an even channel count >= 2 to halve, got {num_channels}")
        if prior not in SPLIT_PRIORS:
            raise ValueError(f"split_prior: unknown prior {prior!r}; choose one of {SPLIT_PRIORS}")
        self.num_keep = num_channels // 2
        self.strategy = strategy
        self.prior_net = (
            ZeroConv2d(self.num_keep, 2 * (num_channels - self.num_keep)) if prior == "gaussian" else None
        )

    def _mean_and_logs(self, x_keep: Tensor) -> tuple[Tensor, Tensor]:
        assert self.prior_net is not None
        h = full_precision(self.prior_net(x_keep))  # the prior in float32 under autocast
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.strategy.permute(x)
        x_keep, x_out = x[:, : self.num_keep], x[:, self.num_keep :]
        if self.prior_net is None:
            return x, x.new_zeros(x.shape[0])
        mean, logs = self._mean_and_logs(x_keep)
        z = (full_precision(x_out) - mean) * torch.exp(-logs)
        return torch.cat([x_keep, z], dim=1), -sum_per_sample(logs)

    def inverse(self, y: Tensor) -> Tensor:
        if self.prior_net is not None:
            y_keep, z = y[:, : self.num_keep], y[:, self.num_keep :]
            mean, logs = self._mean_and_logs(y_keep)
            y = torch.cat([y_keep, mean + z * torch.exp(logs)], dim=1)
        return self.strategy.unpermute(y)


class LearnedTopPrior(Bijection):
    """Glow's learned top prior as an affine standardisation: z = (x - mean) * exp(-logs).

    Glow's ``learntop`` feeds zeros through a zero-initialised conv, which leaves only its bias: a
    learned per-channel mean and log-scale. x: (B, C, H, W) -> z: (B, C, H, W).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = torch.nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.mean) * torch.exp(-self.logs)
        log_det = -(x.shape[2] * x.shape[3]) * self.logs.sum()
        return z, log_det.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return self.mean + z * torch.exp(self.logs)
