"""Test-set bounds beyond the one-draw bits/dim: the importance-weighted bound (IWBO), and seeding of
every noise a forward pass draws.

A model with variational dequantization or DenseFlow's augmentation trains on a variational bound
(the ELBO); ``pipeline.step.evaluate`` reports it on the test set as ``test/bits_per_dim``. The IWBO
with K draws (Burda et al. 2016; DenseFlow's ``eval_loglik.py --k``) is tighter, approaches -log p(x)
as K grows, and costs K forward passes per image, so the trainer computes it once, at the end
(``run.iwbo_samples``). Like ``evaluate`` it is exact across ranks: each rank bounds every image of
its share with all K draws, then sums and counts are reduced in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from flows import FlowModel
from pipeline.runtime import Runtime
from pipeline.step import mean_over_test_set


@contextlib.contextmanager
def seeded_noise(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG (CPU, and ``device``'s if CUDA) seeded to ``seed`` and
    restore it afterwards: DenseFlow's cross-unit noise and the variational dequantizer draw from it,
    so a bound computed under the same seed is reproducible and training's random stream is untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate_iwbo(
    flow: FlowModel,
    batches: Iterable[Tensor],
    *,
    runtime: Runtime,
    seed: int,
    num_samples: int,
    chunk_size: int = 0,
) -> tuple[float, int]:
    """IWBO bits/dim with K = ``num_samples`` over every image of every rank's share:
    (sum over images / count, count). ``chunk_size``: images x draws per forward (0 = one batch)."""
    with seeded_noise(seed * 1_000_003 + runtime.rank, runtime.device):
        return mean_over_test_set(
            flow,
            batches,
            lambda x: flow.iwbo_bits_per_dim(x, num_samples, chunk_size=chunk_size or None),
            runtime=runtime,
        )
