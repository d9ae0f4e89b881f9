"""Per-process RNG states (torch CPU, the current CUDA device, Python's ``random``): what a checkpoint
carries per rank so that a resumed run draws the same dequantization noise and augmentations as an
uninterrupted one (``TrainState.snapshot`` gathers them, ``TrainState.resume`` restores this rank's)."""

from __future__ import annotations

import random
from typing import Any

import torch


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch CPU, the current CUDA device, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
