"""Nystrom attention as DenseFlow's code computes it (denseflow/nn/blocks/attention.py).

Nystromformer (Xiong et al. 2021) approximates softmax(Q K^T) V with ``num_landmarks`` landmarks:
segment means of the queries and keys. DenseFlow's version is reproduced operation by operation,
including three choices that differ from the Nystromformer paper (listed in docs/model.md):
- q, k, v are read with ``reshape(N, H*W, 3E)`` from the (N, 3E, H, W) conv output, not a
  channels-last permute, so a "position" row mixes channels and positions; the output is reshaped
  back the same way;
- the three softmaxes normalise over dim -2 (the query axis), not the key axis;
- the output adds v (a residual) before the output 1x1 conv.
The pseudo-inverse uses six iterations of their cubic Newton-Schulz scheme. The module only
conditions couplings, so none of this touches invertibility.

Under autocast only the two 1x1 convs run in bf16: everything between them (landmarks, the three
softmaxes, the pseudo-inverse and the products) runs in float32 with autocast off. The Newton-Schulz
iteration multiplies kv by polynomials with coefficients 7, 15, 13 six times; in bf16 (8 mantissa
bits) it moved an untrained DenseFlow's bits/dim by up to 9e-3 (issue 20). Those matmuls are
(HW x m) and (m x m) with m = 4 landmarks: negligible next to the convs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _bmm_transposed(a: Tensor, b: Tensor) -> Tensor:
    """a (..., i, j), b (..., k, j) -> a @ b^T (..., i, k)."""
    return torch.einsum("...ij,...kj->...ik", a, b)


def iterative_inverse(mat: Tensor, num_iterations: int = 6) -> Tensor:
    """Approximate inverse of each (L, L) matrix of ``mat`` (..., L, L) (Nystromformer, eq. 12)."""
    eye = torch.eye(mat.shape[-1], device=mat.device, dtype=mat.dtype)
    magnitude = mat.abs()
    col = magnitude.sum(dim=-2, keepdim=True).amax(dim=-1, keepdim=True)
    row = magnitude.sum(dim=-1, keepdim=True).amax(dim=-2, keepdim=True)
    v = mat.transpose(-1, -2) / (col * row)
    for _ in range(num_iterations):
        kv = mat @ v
        v = (0.25 * v) @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return v


class PseudoInverse(nn.Module):
    """``iterative_inverse`` as a module, (..., L, L) -> (..., L, L), always in float32 or wider (a
    forward hook can check the dtype; it has no parameters, so state_dicts are unchanged)."""

    def __init__(self, num_iterations: int = 6) -> None:
        super().__init__()
        self.num_iterations = num_iterations

    def forward(self, mat: Tensor) -> Tensor:
        if mat.dtype in (torch.float16, torch.bfloat16):
            mat = mat.float()
        with torch.autocast(mat.device.type, enabled=False):
            return iterative_inverse(mat, self.num_iterations)


class NystromAttention(nn.Module):
    """(N, C, H, W) -> (N, C, H, W); H*W must be divisible by ``num_landmarks``."""

    def __init__(self, in_channels: int, embed_dim: int, num_landmarks: int) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"NystromAttention: embed_dim must be >= 1, got {embed_dim} (in_channels >= 2)")
        self.qkv = nn.Conv2d(in_channels, 3 * embed_dim, kernel_size=1)
        self.out = nn.Conv2d(embed_dim, in_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.num_landmarks = num_landmarks
        self.pseudo_inverse = PseudoInverse()

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        positions, e, m = h * w, self.embed_dim, self.num_landmarks
        if positions % m:
            raise ValueError(f"NystromAttention: {h}x{w} positions are not divisible by {m} landmarks")
        qkv = self.qkv(x)
        if qkv.dtype in (torch.float16, torch.bfloat16):
            qkv = qkv.float()
        with torch.autocast(x.device.type, enabled=False):  # float32 between the convs (module doc)
            q, k, v = qkv.reshape(n, positions, 3 * e).chunk(3, dim=-1)
            scale = positions**0.5
            q_landmarks = q.reshape(n, m, positions // m, e).mean(dim=-2) / scale
            k_landmarks = k.reshape(n, m, positions // m, e).mean(dim=-2) / scale
            kernel_1 = torch.softmax(_bmm_transposed(q, k_landmarks), dim=-2)  # (N, HW, m)
            kernel_2 = torch.softmax(_bmm_transposed(q_landmarks, k_landmarks), dim=-2)  # (N, m, m)
            kernel_3 = torch.softmax(_bmm_transposed(q_landmarks, k), dim=-2)  # (N, m, HW)
            out = (kernel_1 @ self.pseudo_inverse(kernel_2)) @ (kernel_3 @ v) + v  # (N, HW, E)
        return self.out(out.reshape(n, e, h, w))
