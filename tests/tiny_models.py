"""Tiny flows and random uint8 images shared by the registry, serving and hostile-input tests.

One definition, so a test that loads a registered model and a test that serves it score the same
kind of model on the same kind of pixels.
"""

from __future__ import annotations

import torch

import flows

SHAPE = (3, 8, 8)


def random_images(n: int, seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """(n, C, H, W) uint8 pixels, uniform over 0..255, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)


def tiny_flow(
    strategy: str = "eiw", shape: tuple[int, int, int] = SHAPE, *, init_seed: int | None = 3
) -> flows.FlowModel:
    """A trained-looking 2-level Glow in eval mode: ActNorm initialised on 8 images and the split
    order frozen into its buffers (the EIW order from step 0), as a registered model holds it."""
    split = flows.SplitConfig(strategy=strategy, freeze_after_steps=0)
    cfg = flows.FlowConfig(
        image_shape=shape, num_levels=2, num_steps=2, hidden_channels=8, init_seed=init_seed, split=split
    )
    model = flows.build_flow(cfg)
    flows.initialize_actnorm(model, random_images(8, seed=1, shape=shape))
    model.advance(0)
    return model.eval()
