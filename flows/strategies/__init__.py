"""Split strategies and the factory that builds one from a ``SplitConfig``."""

from __future__ import annotations

from flows.config import SplitConfig
from flows.strategies.base import SplitStrategy
from flows.strategies.static import StaticSplit

STRATEGIES = ("static",)


def build_split_strategy(cfg: SplitConfig, *, num_channels: int, height: int, width: int) -> SplitStrategy:
    """One strategy instance for a split whose input is (num_channels, height, width)."""
    if cfg.strategy == "static":
        return StaticSplit()
    raise ValueError(f"split.strategy: unknown strategy {cfg.strategy!r}; choose one of {STRATEGIES}")


__all__ = ["STRATEGIES", "SplitStrategy", "StaticSplit", "build_split_strategy"]
