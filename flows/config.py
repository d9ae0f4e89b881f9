"""Typed model configuration: plain dataclasses whose ``__post_init__`` checks raise ``ValueError``
naming the field. The pipeline validates them from YAML (pipeline/config.py, pydantic), so flows/
imports only torch and the standard library."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

# Each strategy's config lives next to its code (flows/strategies/<name>.py); ``SplitConfig(**keys)``
# picks the class by ``strategy`` and reads the old flat keys too.
from flows.strategies import STRATEGIES, SplitConfig, SplitOptions, StaticConfig  # noqa: F401

COUPLINGS = ("affine", "additive")
SPLIT_STRATEGIES = STRATEGIES
MEMORY_MODES = ("standard", "invertible", "checkpoint")
BASES = ("glow", "denseflow")
DEQUANTIZATIONS = ("uniform", "variational")


def _positive_ints(name: str, values: object, length: int | None = None) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}: expected a list of positive integers, got {values!r}")
    out = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in out) or not out:
        raise ValueError(f"{name}: expected a non-empty list of positive integers, got {list(out)}")
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} values (one per level), got {len(out)}")
    return tuple(int(v) for v in out)


@dataclass(kw_only=True)
class DenseFlowConfig:
    """DenseFlow's architecture (Grcic et al. 2021; matejgrcic/DenseFlow, experiments/image/model):
    ``FlowConfig.base: denseflow`` reads it, Glow ignores it. Lists have one value per level
    (``FlowConfig.num_levels`` of them). The defaults are DenseFlow's published recipe ("DF_74_10":
    ``--block_conf 6 4 1 --layers_conf 5 6 20 --layer_mid_chnls 48 48 48 --growth_rate 10``).

    units: invertible dense block length per level (``block_conf``): units of which every one after
        the first adds ``growth_rate`` channels of cross-unit noise.
    layers: flow layers per unit (``layers_conf``): [ActNorm, 1x1 conv, affine coupling, switch].
    mid_channels: width of each coupling network (``layer_mid_chnls``).
    growth_rate: noise channels added before each unit after the first.
    net_depth, net_growth: the coupling network's dense block (7 and 64, fixed in their DNMH).
    attention_landmarks: Nystrom landmarks of the coupling network's attention (4 in their code);
        height x width of every level must be divisible by it.
    depth_multiplier: scales ``layers`` (flow layers per unit) at every level, each rounded and at
        least 1 (``level_layers``): depth as one number, which a search can sample (Optuna cannot
        sample lists). 1 = ``layers`` as given; ``units``, widths and the noise are unchanged.
    """

    units: tuple[int, ...] = (6, 4, 1)
    layers: tuple[int, ...] = (5, 6, 20)
    mid_channels: tuple[int, ...] = (48, 48, 48)
    growth_rate: int = 10
    net_depth: int = 7
    net_growth: int = 64
    attention_landmarks: int = 4
    depth_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.depth_multiplier, bool) or not 0.0 < self.depth_multiplier <= 64.0:
            raise ValueError(f"denseflow.depth_multiplier: must be in (0, 64], got {self.depth_multiplier!r}")
        self.units = _positive_ints("denseflow.units", self.units)
        self.layers = _positive_ints("denseflow.layers", self.layers, len(self.units))
        self.mid_channels = _positive_ints("denseflow.mid_channels", self.mid_channels, len(self.units))
        for name in ("growth_rate", "net_depth", "net_growth", "attention_landmarks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"denseflow.{name}: must be an integer >= 1, got {value!r}")

    def level_layers(self, level: int) -> int:
        """Flow layers per unit at ``level``: ``layers[level]`` scaled by ``depth_multiplier``."""
        return max(1, round(self.layers[level] * self.depth_multiplier))


@dataclass(kw_only=True)
class DequantizerConfig:
    """The variational dequantizer q(u | x) (Flow++, Ho et al. 2019), as DenseFlow builds it
    (experiments/image/model/dequantization.py, ``DequantizationFlow``); read when
    ``FlowConfig.dequantization: variational``. Defaults are theirs.

    num_steps: conditional coupling steps, each [1x1 conv, affine coupling conditioned on x].
    context_channels: channels of the context computed from x (``num_context``).
    mid_channels, depth, growth: each coupling network (a DenseNet: 1x1 conv, residual dense block of
        ``depth`` layers growing by ``growth``, zero-initialised 1x1 conv).
    context_depth, context_growth: the two dense blocks of the context network.
    """

    num_steps: int = 4
    context_channels: int = 64
    mid_channels: int = 64
    depth: int = 4
    growth: int = 64
    context_depth: int = 4
    context_growth: int = 16

    def __post_init__(self) -> None:
        for name in ("num_steps", "context_channels", "mid_channels", "depth", "growth", "context_depth",
                     "context_growth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"dequantizer.{name}: must be an integer >= 1, got {value!r}")


@dataclass(kw_only=True)
class FlowConfig:
    """A multi-scale flow: ``num_levels`` levels, a split after each but the last.

    base: "glow" (per level: squeeze, ``num_steps`` x [ActNorm, 1x1 conv, coupling]; ``num_steps``,
        ``hidden_channels`` and ``coupling`` apply) or "denseflow" (DenseFlow: an initial squeeze, per
        level an invertible dense block with cross-unit noise, ``denseflow`` applies; docs/model.md,
        "DenseFlow base"). Split strategies, priors and dequantization are shared.
    dequantization: "uniform" (u ~ U[0, 1)) or "variational" (u ~ q(u | x), a conditional flow,
        ``dequantizer`` applies). With "variational" or with base "denseflow" (its noise) the
        training loss is a variational bound; ``FlowModel.iwbo_bits_per_dim`` tightens it.

    image_shape: (C, H, W) of the data; H and W must be divisible by 2**num_levels.
    split: the split strategy's config, one class per strategy next to its code (``StaticConfig``,
        ``EIWConfig``, ``LCMAConfig`` in flows/strategies/), chosen by its ``strategy``; build it with
        ``SplitConfig(strategy=..., **knobs)`` (old flat keys are read too).
    memory: what a training forward keeps for backward (flows/invertible.py; docs/model.md, "Memory
        modes"). "standard": every step's activations (plain autograd); "invertible": only each level's
        output, every step's input is rebuilt with its inverse in backward (memory flat in num_steps,
        about 1.3x the step time); "checkpoint": each level's input, the level is recomputed in backward
        (per-level activation checkpointing). Same model, same state_dict; eval and sampling (no
        gradients) run the same code in every mode.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_levels: int = 3
    num_steps: int = 8
    hidden_channels: int = 128
    coupling: str = "affine"
    split_prior: str = "gaussian"
    learn_top_prior: bool = True
    n_bits: int = 8
    init_seed: int = 0
    memory: str = "standard"
    base: str = "glow"
    dequantization: str = "uniform"
    split: SplitOptions = field(default_factory=StaticConfig)
    denseflow: DenseFlowConfig = field(default_factory=DenseFlowConfig)
    dequantizer: DequantizerConfig = field(default_factory=DequantizerConfig)

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape
        ):
            raise ValueError(f"image_shape: expected (C, H, W) of positive integers, got {self.image_shape}")
        self.image_shape = tuple(int(s) for s in shape)
        _, height, width = self.image_shape
        if self.num_levels < 1:
            raise ValueError(f"num_levels: must be >= 1, got {self.num_levels}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")
        if self.hidden_channels < 1:
            raise ValueError(f"hidden_channels: must be >= 1, got {self.hidden_channels}")
        factor = 2**self.num_levels
        if height % factor or width % factor:
            raise ValueError(
                f"image_shape: height and width ({height}x{width}) must be divisible by "
                f"2**num_levels = {factor}"
            )
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits: must be in 1..8, got {self.n_bits}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling: unknown {self.coupling!r}; choose one of {COUPLINGS}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory: unknown {self.memory!r}; choose one of {MEMORY_MODES}")
        if self.base not in BASES:
            raise ValueError(f"base: unknown {self.base!r}; choose one of {BASES}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise ValueError(
                f"dequantization: unknown {self.dequantization!r}; choose one of {DEQUANTIZATIONS}"
            )
        if self.base == "denseflow":
            self._check_denseflow()
        if self.split_prior not in ("gaussian", "standard"):
            raise ValueError(f"split_prior: unknown {self.split_prior!r}; choose 'gaussian' or 'standard'")

    def _check_denseflow(self) -> None:
        dense = self.denseflow
        if len(dense.units) != self.num_levels:
            raise ValueError(
                f"denseflow.units: one value per level expected ({self.num_levels} levels), "
                f"got {list(dense.units)}"
            )
        if self.memory == "invertible":
            raise ValueError(
                "memory: 'invertible' needs exact per-step inverses without noise; base 'denseflow' "
                "draws cross-unit noise in every forward, use 'standard' or 'checkpoint'"
            )
        _, height, width = self.image_shape
        for level in range(self.num_levels):
            positions = (height >> (level + 1)) * (width >> (level + 1))
            if positions % dense.attention_landmarks:
                raise ValueError(
                    f"denseflow.attention_landmarks: level {level} has {positions} positions, not "
                    f"divisible by {dense.attention_landmarks} (Nystrom attention pools them evenly)"
                )

    @property
    def num_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w
