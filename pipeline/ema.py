"""An exponential moving average of the flow's weights (``optim.ema_decay``; Polyak averaging).

openai/glow averages its weights for evaluation, and users of generative models expect an averaged
model to be evaluated and registered. After every optimizer step the averaged parameters move
towards the trained ones, ``ema += (1 - decay) * (raw - ema)``, on the device with no host read; a
skipped step (pipeline/step.py) moves nothing. Buffers (ActNorm's initialised flags, EIW's and
LCMA's held orders and counters, BatchNorm's running statistics) are copied, not averaged: they are
states, and an average of two permutations is not a permutation.

Why not ``torch.optim.swa_utils.AveragedModel``: its ``update_parameters`` branches on
``n_averaged == 0`` (a host read every step) and with ``use_buffers=False`` leaves buffers stale.
The average starts from the weights after ActNorm's data-dependent initialisation (``fit`` creates
it then), or from a checkpoint's; it is saved in checkpoints (``ema``) and resumes exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from flows import FlowModel


class WeightAverage:
    """``flow``: the averaged model (a copy of the trained one, in eval mode, no gradients)."""

    def __init__(self, flow: FlowModel, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"optim.ema_decay: must be in (0, 1), got {decay}")
        self.decay = decay
        self.flow = copy.deepcopy(flow).eval()
        self.flow.requires_grad_(False)

    @torch.no_grad()
    def update(self, trained: FlowModel, skipped: Tensor) -> None:
        """One optimizer step done on ``trained``; ``skipped`` (0-dim bool device tensor): it was not."""
        weight = (1.0 - self.decay) * (~skipped).to(torch.float64)
        for ema, raw in zip(self.flow.parameters(), trained.parameters(), strict=True):
            ema.lerp_(raw, weight.to(ema.dtype))
        for ema, raw in zip(self.flow.buffers(), trained.buffers(), strict=True):
            ema.copy_(raw)

    def ready(self) -> FlowModel:
        """The averaged flow, ready to evaluate: Python mirrors of buffers (a strategy's ``frozen``
        flag) re-read through the load hooks, since ``update`` copies the buffers alone."""
        self.flow.load_state_dict(self.flow.state_dict())
        return self.flow.eval()

    def state_dict(self) -> dict[str, Tensor]:
        return self.flow.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.flow.load_state_dict(state)
