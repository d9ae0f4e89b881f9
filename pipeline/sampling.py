"""Sample grids at a few temperatures, written as PNG files (MLflow artifacts).

Glow samples at reduced temperature T (latents ~ N(0, T^2 I)) because T = 1 samples from a
likelihood-trained flow look noisy; a grid per T shows both the model and that trade-off.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from flows import FlowModel


@torch.no_grad()
def sample_grids(
    model: FlowModel, temperatures: tuple[float, ...] | list[float], *, num: int, seed: int
) -> dict[float, Tensor]:
    """{T: float grid (C, H', W') in [0, 1]} with ``num`` samples per temperature, same seed for every T.

    The same seed makes the grids comparable: each cell is the same latent scaled by T.
    """
    was_training = model.training
    model.eval()
    nrow = max(1, int(math.sqrt(num)))
    grids = {}
    try:
        for t in temperatures:
            generator = torch.Generator().manual_seed(seed)
            images = model.sample(num, temperature=float(t), generator=generator)
            grids[float(t)] = make_grid(images.cpu().float() / 255.0, nrow=nrow, padding=2)
    finally:
        model.train(was_training)
    return grids


def save_grids(grids: dict[float, Tensor], directory: str | Path, *, step: int) -> list[Path]:
    """One PNG per temperature: ``samples_step{step:09d}_T{t}.png``; returns the paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, grid in grids.items():
        path = d / f"samples_step{step:09d}_T{t:g}.png"
        save_image(grid, path)
        paths.append(path)
    return paths
