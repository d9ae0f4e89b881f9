"""Variational dequantization (Flow++, Ho et al. 2019, sec. 3.1), as DenseFlow / the EIW authors build it.

Instead of ``u ~ U[0, 1)^D``, the dequantization noise comes from a conditional flow ``q(u | x)``; with
``z = (x + u) / 2^n_bits`` the model's density gives the variational bound

    log P(x) >= E_{u ~ q(u | x)} [ log p(z) - D log(2^n_bits) - log q(u | x) ],

which is the uniform bound when ``q`` is uniform and is tighter otherwise. This module only draws
``u`` and ``log q(u | x)``; the model forms ``z`` and the bound (docs/model.md, "Variational
dequantization").

The flow follows their ``DequantizationFlow`` (experiments/image/model/dequantization.py, a
``ConditionalInverseFlow`` wrapped by denseflow/transforms/surjections/dequantization_variational.py):

- context = DenseBlock(mid -> num_context)(conv2x2/2(DenseBlock(C -> mid)(2 x / (2^n_bits - 1) - 1)))
  on the squeezed grid (H/2, W/2); gated dense blocks, PyTorch's default init.
- eps ~ N(loc, diag(exp(log_scale))^2) per channel on (4C, H/2, W/2) (their ``ConvNormal2d``, zero init).
- num_steps x [1x1 conv, conditional affine coupling], a final 1x1 conv, unsqueeze, sigmoid -> u.
- log q(u | x) = log N(eps) - sum of the transforms' log-dets (eps -> u).

docs/model.md lists every difference from their code (LU 1x1 convs, dtype of the context input, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.bijection import Bijection, full_precision, sum_per_sample
from flows.conditional_coupling import ConditionalAffineCoupling
from flows.config import DequantizerConfig
from flows.denseflow.dense_net import DenseBlock
from flows.invconv import InvConv1x1
from flows.squeeze import Squeeze


class Sigmoid(Bijection):
    """u = sigmoid(x) elementwise; log_det = sum log sigmoid'(x) = sum(-softplus(-x) - softplus(x)).

    The log-det is computed from ``x``, not from ``u``, so it stays finite where ``u`` rounds to 0 or 1
    (float32 saturates at x > ~17). ``forward`` clamps nothing. ``inverse`` is the logit and raises a
    ``ValueError`` unless every value lies strictly inside (0, 1) (their ``Sigmoid`` asserts [0, 1]
    and clamps by ``eps=0``, i.e. returns +-inf at the ends).
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = full_precision(x)  # u and log q(u | x) in float32 under autocast (a bf16 u is off by 2^-9)
        return torch.sigmoid(x), sum_per_sample(-F.softplus(-x) - F.softplus(x))

    def inverse(self, y: Tensor) -> Tensor:
        inside = (y > 0) & (y < 1)
        if not bool(inside.all()):
            bad = y[~inside]
            raise ValueError(
                f"Sigmoid.inverse: {bad.numel()} value(s) outside the open interval (0, 1), e.g. "
                f"{bad.flatten()[0].item()!r}; the logit is undefined there"
            )
        return torch.log(y) - torch.log1p(-y)


class Unsqueeze(Bijection):
    """Inverse of ``flows.squeeze.Squeeze``: (B, 4C, H, W) -> (B, C, 2H, 2W), log_det = 0.

    Input channel ``4c + 2i + j`` goes to pixel ``(2h + i, 2w + j)`` of channel ``c``: the same layout
    as their ``Unsqueeze2d`` (``Squeeze2d(ordered=False)``, RealNVP's ``squeeze_2x2``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = Squeeze()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self.squeeze(y)[0]


class DequantizationFlow(Bijection):
    """The conditional flow eps (B, 4C, H/2, W/2) -> u (B, C, H, W) in (0, 1), given a context
    (B, num_context, H/2, W/2): num_steps x [InvConv1x1, ConditionalAffineCoupling], InvConv1x1,
    Unsqueeze, Sigmoid. ``forward(eps, context=...) -> (u, log_det)``; ``inverse(u, context=...) -> eps``.
    """

    def __init__(self, squeezed_channels: int, context_channels: int, cfg: DequantizerConfig) -> None:
        super().__init__()
        layers: list[Bijection] = []
        for _ in range(cfg.num_steps):
            layers.append(InvConv1x1(squeezed_channels))
            layers.append(
                ConditionalAffineCoupling(
                    squeezed_channels, context_channels, mid_channels=cfg.mid_channels, depth=cfg.depth,
                    growth=cfg.growth,
                )
            )
        layers += [InvConv1x1(squeezed_channels), Unsqueeze(), Sigmoid()]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, *, context: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            if isinstance(layer, ConditionalAffineCoupling):
                x, layer_log_det = layer(x, context=context)
            else:
                x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: Tensor, *, context: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            if isinstance(layer, ConditionalAffineCoupling):
                y = layer.inverse(y, context=context)
            else:
                y = layer.inverse(y)
        return y


class VariationalDequantizer(nn.Module):
    """q(u | levels): integer pixel levels (B, C, H, W) -> u (B, C, H, W) in (0, 1) and log q (B,) in nats.

    ``forward`` draws u by the reparametrisation (gradients reach every parameter through u and log q);
    ``log_prob`` evaluates log q(u | levels) of a given u by inverting the flow.
    """

    def __init__(self, image_shape: tuple[int, int, int], *, n_bits: int, cfg: DequantizerConfig) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"VariationalDequantizer: image_shape must be (C, H, W), got {image_shape!r}")
        c, h, w = (int(s) for s in image_shape)
        if h % 2 or w % 2:
            raise ValueError(
                f"VariationalDequantizer: image_shape {tuple(image_shape)!r} needs an even height and "
                "width (the flow runs on the 2x2-squeezed grid)"
            )
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
            raise ValueError(f"VariationalDequantizer: n_bits must be an integer in 1..16, got {n_bits!r}")
        self.image_shape = (c, h, w)
        self.n_bits = n_bits
        self.latent_shape = (4 * c, h // 2, w // 2)
        self.context_net = nn.Sequential(
            DenseBlock(c, cfg.mid_channels, depth=cfg.context_depth, growth=cfg.context_growth, gated=True),
            nn.Conv2d(cfg.mid_channels, cfg.mid_channels, kernel_size=2, stride=2),
            DenseBlock(
                cfg.mid_channels, cfg.context_channels, depth=cfg.context_depth, growth=cfg.context_growth,
                gated=True,
            ),
        )
        self.base_loc = nn.Parameter(torch.zeros(1, 4 * c, 1, 1))
        self.base_log_scale = nn.Parameter(torch.zeros(1, 4 * c, 1, 1))
        self.flow = DequantizationFlow(4 * c, cfg.context_channels, cfg)

    def _check(self, levels: Tensor, name: str) -> None:
        if levels.dim() != 4 or tuple(levels.shape[1:]) != self.image_shape:
            raise ValueError(
                f"VariationalDequantizer.{name}: expected levels of shape (B, *{self.image_shape}), "
                f"got {tuple(levels.shape)}"
            )

    def context(self, levels: Tensor) -> Tensor:
        """levels (B, C, H, W) -> context (B, num_context, H/2, W/2), from levels scaled to [-1, 1]."""
        x = levels.to(self.base_loc.dtype)
        return self.context_net(2.0 * x / (2**self.n_bits - 1) - 1.0)

    def base_log_prob(self, eps: Tensor) -> Tensor:
        """log N(eps; loc, exp(log_scale)^2) summed per sample (their ``DiagonalNormal.log_prob``)."""
        log_scale = self.base_log_scale
        inner = -0.5 * torch.exp(-2.0 * log_scale) * (eps - self.base_loc) ** 2
        return sum_per_sample(inner - log_scale - 0.5 * math.log(2.0 * math.pi))

    def forward(self, levels: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """levels (B, C, H, W) -> (u (B, C, H, W) in (0, 1), log_q (B,) = log q(u | levels) in nats).

        The noise is ``torch.randn((B, 4C, H/2, W/2), generator=generator)`` on the parameters' device
        and dtype; a float32 u can round to exactly 0 or 1 where the flow saturates (log_q stays exact).
        """
        self._check(levels, "forward")
        context = self.context(levels)
        noise = torch.randn(
            (levels.shape[0], *self.latent_shape), generator=generator, device=self.base_loc.device,
            dtype=self.base_loc.dtype,
        )
        eps = self.base_loc + torch.exp(self.base_log_scale) * noise
        u, log_det = self.flow(eps, context=context)
        return u, self.base_log_prob(eps) - log_det

    def log_prob(self, u: Tensor, levels: Tensor) -> Tensor:
        """log q(u | levels) (B,) for u (B, C, H, W) strictly inside (0, 1), by inverting the flow.

        Raises ValueError if any u is outside (0, 1). log q(u) = log N(eps) - log_det(eps -> u) with
        eps = flow^-1(u); the log-det is the forward one evaluated at the recovered eps.
        """
        self._check(levels, "log_prob")
        if u.shape != levels.shape:
            raise ValueError(
                f"VariationalDequantizer.log_prob: u {tuple(u.shape)} and levels {tuple(levels.shape)} differ"
            )
        context = self.context(levels)
        eps = self.flow.inverse(u.to(self.base_loc.dtype), context=context)
        _, log_det = self.flow(eps, context=context)
        return self.base_log_prob(eps) - log_det
