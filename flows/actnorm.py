"""ActNorm (Glow, Kingma & Dhariwal 2018, sec. 3.1): per-channel affine with data-dependent init.

y = (x + bias) * exp(log_scale), log_det = H * W * sum_c log_scale_c.

The data-dependent initialisation is an explicit call (``initialize_actnorm``), never a side effect
of the first forward pass: under DDP a lazy init would run independently on each replica with a
different batch. The ``initialized`` buffer is saved in the state_dict, so a reloaded model is never
re-initialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from flows.bijection import Bijection


class ActNorm(Bijection):
    """x: (B, C, H, W) -> y: (B, C, H, W)."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps
        self._init_pending = False

    @torch.no_grad()
    def _initialize_from(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._init_pending = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._init_pending:
            self._initialize_from(x)
        scale = torch.exp(self.log_scale)
        # Same as (x + bias) * scale, but autograd keeps only x (alive anyway), not a new activation.
        y = torch.addcmul(self.bias * scale, x, scale)
        log_det = (x.shape[2] * x.shape[3]) * self.log_scale.sum()
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


@contextlib.contextmanager
def _pending_init(model: nn.Module) -> Iterator[list[ActNorm]]:
    layers = [m for m in model.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
    for layer in layers:
        layer._init_pending = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer._init_pending = False


@torch.no_grad()
def initialize_actnorm(model: nn.Module, batch: Tensor) -> int:
    """Data-dependent init of every not-yet-initialised ActNorm in ``model`` from one batch.

    ``batch`` is what ``model`` consumes: a uint8 image batch (B, C, H, W) for a ``FlowModel``
    (dequantized the same way as in training), or a float tensor for a bare bijection. Each layer sees
    the activations produced by the already-initialised layers before it, as in Glow. Returns the
    number of layers initialised. Call it once, before DDP wraps the model: the DDP constructor
    broadcasts rank 0's parameters and buffers.
    """
    with _pending_init(model) as layers:
        if hasattr(model, "dequantize") and hasattr(model, "encode"):
            model.encode(model.dequantize(batch))
        else:
            model(batch)
    return len(layers)
