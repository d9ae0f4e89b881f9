"""Invertible 1x1 convolution with the LU parametrisation (Glow, sec. 3.2).

W = P L (U + diag(sign_s * exp(log_s))), with P a fixed permutation, L unit lower triangular and U
strictly upper triangular. log|det W| = sum(log_s), so the log-det costs O(C) instead of O(C^3), and
the inverse is two triangular solves rather than a dense inverse (which loses accuracy in float32).

Under autocast the 1x1 conv runs in float32 (autocast off): its output is the flow's state, the next
layer's input and eventually a latent, so a bf16 conv would round every activation of every step to 8
mantissa bits. Measured on a trained small Glow (benchmarks/bf16_parity.py, docs/benchmarks.md), bf16
in the 1x1 convs alone caused nearly all of the bf16 gradient error (10-12% on every layer type) and
the bits/dim shift; bf16 in the coupling nets, which only condition a float32 affine map, 0.3%.
Its cost is C^2 multiply-adds per pixel, a few percent of a step's (more at DenseFlow's widest level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.bijection import Bijection, full_precision


class InvConv1x1(Bijection):
    """x: (B, C, H, W) -> W x per pixel, log_det = H * W * sum(log|s|)."""

    def __init__(self, num_channels: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # Random rotation as in Glow; QR of a Gaussian matrix gives a uniformly random orthogonal W.
        w_init, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator))
        p, lower, upper = torch.linalg.lu(w_init)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """The dense (C, C) matrix W = P L U."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = full_precision(x)
        with torch.autocast(x.device.type, enabled=False):  # float32 under autocast (module doc)
            y = F.conv2d(x, self.weight().to(x.dtype)[:, :, None, None])
        log_det = (x.shape[2] * x.shape[3]) * self.log_s.sum()
        # The log-det stays in the parameters' precision: under autocast x may be bf16, and a bf16
        # H * W * sum(log s) would carry a 0.4% error into every sample's log-likelihood.
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        y = full_precision(y)
        with torch.autocast(y.device.type, enabled=False):  # float32 under autocast, as forward
            lower, upper = self._factors()
            # W^-1 = U^-1 L^-1 P^T, each factor by a triangular solve against the identity.
            eye = self.eye.to(lower.dtype)
            l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
            w_inv = (u_inv @ l_inv @ self.perm.T).to(y.dtype)
            return F.conv2d(y, w_inv[:, :, None, None])
