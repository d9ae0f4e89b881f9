"""Sample grids at a few temperatures: MLflow images on a step slider, and PNG files.

Glow samples at reduced temperature T (latents ~ N(0, T^2 I)) because T = 1 samples from a
likelihood-trained flow look noisy; a grid per T shows both the model and that trade-off. Every
evaluation logs one image per T under the key ``samples_T<T>`` with its step (``grid_images``), so
the MLflow UI's slider shows the model improving; the final grids are also plain files
(``save_grids``) under ``samples/``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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


def image_key(temperature: float) -> str:
    """The MLflow image key of the grids at ``temperature``: ``samples_T0.7``, ``samples_T1``."""
    return f"samples_T{temperature:g}"


def grid_images(grids: dict[float, Tensor]) -> dict[str, np.ndarray]:
    """{image key: uint8 (H, W, C) array, or (H, W) for one channel} for ``mlflow.log_image``."""
    images = {}
    for t, grid in grids.items():
        array = (grid.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        array = array.transpose(1, 2, 0)
        images[image_key(t)] = array[:, :, 0] if array.shape[2] == 1 else array
    return images


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
