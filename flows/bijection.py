"""The bijection contract shared by every invertible layer.

Direction: ``forward`` maps data -> latent and returns ``(y, log_det)`` where ``log_det`` has shape
``(B,)`` and equals ``log |det dy/dx|`` per sample. ``inverse`` maps latent -> data and returns ``x``
only: the log-det of the inverse is the negation of the forward one, and no caller of ``inverse``
(decode, sampling) needs it. Keeping one return shape per direction everywhere avoids the
"sometimes a tuple" bugs that plague flow libraries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Bijection(nn.Module):
    """Base class: subclasses implement ``forward`` and ``inverse``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Compose(Bijection):
    """Applies bijections in order; log-dets add up."""

    def __init__(self, *layers: Bijection) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a 16-bit float (a bf16/fp16 activation under autocast), else unchanged
    (float32 and the tests' float64 stay as they are).

    The float32 islands of autocast (docs/model.md, "bf16 autocast"): log-determinants, priors and
    coupling scales are sums of thousands of terms and differences of large numbers; bf16 keeps 8
    mantissa bits (a 0.4% rounding per value), so they are formed from float32 copies. Elementwise ops
    on float32 tensors stay float32 under autocast; only the listed ops (convs, matmuls) drop to bf16.
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sum_per_sample(t: Tensor) -> Tensor:
    """Sum over every axis but the batch axis: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed per sample: (B, ...) -> (B,), in at least float32 (``full_precision``)."""
    z = full_precision(z)
    return -0.5 * sum_per_sample(z * z) - 0.5 * z[0].numel() * torch.log(
        torch.tensor(2.0 * torch.pi, dtype=z.dtype, device=z.device)
    )
