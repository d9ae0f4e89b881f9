"""flows: Glow-style multi-scale normalizing flows with pluggable split strategies (pure torch)."""

from flows.actnorm import ActNorm, initialize_actnorm
from flows.bijection import Bijection, Compose
from flows.config import FlowConfig, SplitConfig
from flows.coupling import AdditiveCoupling, AffineCoupling
from flows.invconv import InvConv1x1
from flows.model import FlowModel, build_flow
from flows.split import LearnedTopPrior, Split
from flows.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijection",
    "Compose",
    "FlowConfig",
    "FlowModel",
    "InvConv1x1",
    "LearnedTopPrior",
    "Split",
    "SplitConfig",
    "Squeeze",
    "build_flow",
    "initialize_actnorm",
]
