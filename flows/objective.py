"""The training objective: mean bits/dim plus the split strategy's regulariser, weighted by sigma.

sigma is a training setting (the pipeline's ``loss.sigma``), not a model one, so it is an argument here.
"""

from __future__ import annotations

from torch import Tensor


def training_loss(bits_per_dim: Tensor, regularizer: Tensor, sigma: float) -> Tensor:
    """bits_per_dim (B,), regularizer () -> loss (): mean bits/dim + sigma * regularizer, in float32
    (under bf16 autocast the sum of a batch's bits/dim is accumulated in float32)."""
    return bits_per_dim.float().mean() + sigma * regularizer.float()
