"""DenseFlow's levels in the shape ``FlowModel`` assembles: each level's output goes to a split.

Their model (experiments/image/model/dense_flow.py) is: initial squeeze, then per level an invertible
dense block, and between levels a transition [squeeze, (Shuffle,) keep half, factor half out with a
standard normal]. We cut the same sequence at the splits:

    level 0:      squeeze -> block_0 -> squeeze      (the squeeze of transition 0)
    level l:      block_l -> squeeze                 (0 < l < L - 1)
    level L - 1:  block_{L-1}                        (then the learned per-channel Gaussian base)

so the split strategy (static, eiw, lcma) permutes the squeezed channels, exactly where their
``InvertibleTransition`` sorts them. Set ``split_prior: standard`` for their factored-out prior.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.bijection import Bijection, Compose
from flows.config import FlowConfig
from flows.denseflow.block import InvertibleDenseBlock
from flows.denseflow.coupling import DenseAffineCoupling
from flows.squeeze import Squeeze

DENSE_MEMORY_MODES = ("standard", "checkpoint")


class DenseLevel(Compose):
    """One DenseFlow level (a ``Compose``). ``memory``: "standard" keeps every activation;
    "checkpoint" recomputes each coupling network in backward (their ``--checkpointing``)."""

    # LCMA attributes log-det terms to the split input's channels by index; a dense block changes the
    # channel count and ends in a squeeze, so only the log-prior term applies (docs/model.md).
    log_det_by_channel = False

    def __init__(self, *layers: Bijection, memory: str = "standard") -> None:
        super().__init__(*layers)
        self.memory = memory

    @property
    def memory(self) -> str:
        return self._memory

    @memory.setter
    def memory(self, mode: str) -> None:
        if mode not in DENSE_MEMORY_MODES:
            raise ValueError(f"memory: base 'denseflow' supports {DENSE_MEMORY_MODES}, got {mode!r}")
        self._memory = mode
        for module in self.modules():
            if isinstance(module, DenseAffineCoupling):
                module.checkpointing = mode == "checkpoint"

    def rebuild_error(self) -> Tensor | None:
        """Only invertible memory rebuilds inputs; never here."""
        return None


def build_dense_levels(cfg: FlowConfig, generator: torch.Generator) -> tuple[list[DenseLevel], list[int]]:
    """The levels of ``cfg`` (base "denseflow") and each level's output channel count (the split's
    input, or the base's at the top level)."""
    dense = cfg.denseflow
    channels = 4 * cfg.image_shape[0]
    levels, out_channels = [], []
    for level in range(cfg.num_levels):
        block = InvertibleDenseBlock(
            channels,
            num_units=dense.units[level],
            num_layers=dense.level_layers(level),
            mid_channels=dense.mid_channels[level],
            growth_rate=dense.growth_rate,
            net_depth=dense.net_depth,
            net_growth=dense.net_growth,
            num_landmarks=dense.attention_landmarks,
            generator=generator,
        )
        layers: list[Bijection] = [Squeeze()] if level == 0 else []
        layers.append(block)
        channels = block.out_channels
        if level < cfg.num_levels - 1:
            layers.append(Squeeze())
            channels *= 4
        levels.append(DenseLevel(*layers, memory=cfg.memory))
        out_channels.append(channels)
        channels //= 2  # the split keeps half
    return levels, out_channels
