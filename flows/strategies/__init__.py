"""Split strategies, registered by name: ``STRATEGY_CONFIGS[name]`` is the config class (a
``StrategyConfig`` subclass in the strategy's own file) whose ``build`` makes the module.

The training loop drives them through the model, once per optimizer step, and adds the Shuffle
regulariser to its loss::

    model.advance(step)                             # step = optimizer steps completed so far
    loss = training_loss(model.bits_per_dim(x), model.regularization(), sigma)  # flows/objective.py

Adding a strategy: its file holds a ``SplitStrategy`` subclass and a ``StrategyConfig`` subclass
(``strategy: Literal["name"]``, its knobs, ``build``), and ``STRATEGY_CONFIGS`` below gets one line.
The config layer (flows/config.py, the pipeline's discriminated union on ``strategy``) reads this
registry; nothing else changes (docs/model.md, "Adding a strategy").
"""

from __future__ import annotations

from typing import Any, Union

from flows.strategies.base import FreezableStrategy, SplitStrategy, StrategyConfig
from flows.strategies.eiw import EIWConfig, EIWShuffleSplit
from flows.strategies.lcma import LCMAConfig, LCMASplit
from flows.strategies.static import StaticConfig, StaticSplit

STRATEGY_CONFIGS: dict[str, type[StrategyConfig]] = {
    "static": StaticConfig,
    "static_swapped": StaticConfig,
    "eiw": EIWConfig,
    "lcma": LCMAConfig,
}
STRATEGIES = tuple(STRATEGY_CONFIGS)
assert all(name in cls.NAMES for name, cls in STRATEGY_CONFIGS.items()), "a class configures its names"

# FlowConfig.split's type: one of the registered classes (pydantic discriminates them by ``strategy``).
SplitOptions = Union[tuple(dict.fromkeys(STRATEGY_CONFIGS.values()))]  # noqa: UP007 - built at runtime


def legacy_split_keys(split: dict[str, Any]) -> dict[str, Any]:
    """A ``split`` mapping in the old flat form (one class with every strategy's knobs) -> the form of
    its strategy's class. ``lcma_*`` keys become LCMA's own names. A knob of another strategy is an
    error naming it unless it holds that knob's default: a dump of the old flat config wrote every
    knob, and a dump of one strategy's config whose ``strategy`` an override changes carries the
    other's; those are dropped."""
    strategy = split.get("strategy", "static")
    cls = STRATEGY_CONFIGS.get(strategy)
    if cls is None:
        raise ValueError(f"strategy: unknown {strategy!r}; choose one of {STRATEGIES}")
    owners: dict[str, type[StrategyConfig]] = {}
    for other in STRATEGY_CONFIGS.values():
        for name in other.knob_names():
            owners.setdefault(name, other)
        for old in getattr(other, "LEGACY_KEYS", {}):
            owners[old] = other
    out = {key: value for key, value in split.items() if key not in owners or owners[key] is cls}
    foreign = {key: split[key] for key in split if key not in out}
    for key, value in foreign.items():
        other = owners[key]
        field = getattr(other, "LEGACY_KEYS", {}).get(key, key)
        if value == getattr(other(strategy=other.NAMES[0]), field):
            continue
        raise ValueError(
            f"{key}: a knob of strategy {other.NAMES[0]!r}, not of {strategy!r} (strategy {strategy!r} "
            f"takes {', '.join(cls.knob_names()) or 'no knobs'})"
        )
    for old, new in getattr(cls, "LEGACY_KEYS", {}).items():
        if old in out:
            if new in out:
                raise ValueError(f"{old}: the old name of {new}; give only one of them")
            out[new] = out.pop(old)
    return out


def SplitConfig(**split: Any) -> StrategyConfig:  # noqa: N802 - the name every caller already uses
    """The config of ``split["strategy"]`` (default "static") from keywords, old flat keys included:
    ``SplitConfig(strategy="lcma", lcma_warmup_steps=5)`` is ``LCMAConfig(warmup_steps=5)``."""
    split = legacy_split_keys(split)
    split.setdefault("strategy", "static")
    return STRATEGY_CONFIGS[split["strategy"]](**split)


def build_split_strategy(
    cfg: StrategyConfig, *, num_channels: int, height: int, width: int
) -> SplitStrategy:
    """One strategy instance for a split whose input is (num_channels, height, width)."""
    return cfg.build(num_channels, height, width)


__all__ = [
    "STRATEGIES",
    "STRATEGY_CONFIGS",
    "EIWConfig",
    "EIWShuffleSplit",
    "FreezableStrategy",
    "LCMAConfig",
    "LCMASplit",
    "SplitConfig",
    "SplitOptions",
    "SplitStrategy",
    "StaticConfig",
    "StaticSplit",
    "StrategyConfig",
    "build_split_strategy",
    "legacy_split_keys",
]
