"""flows: multi-scale normalizing flows (Glow and DenseFlow bases) with pluggable split strategies,
uniform or variational dequantization, bits/dim and the IWBO (pure torch)."""

from flows.actnorm import ActNorm, initialize_actnorm
from flows.bijection import Bijection, Compose
from flows.config import DenseFlowConfig, DequantizerConfig, FlowConfig, SplitConfig
from flows.coupling import AdditiveCoupling, AffineCoupling
from flows.invconv import InvConv1x1
from flows.model import FlowModel, build_flow
from flows.objective import training_loss
from flows.split import LearnedTopPrior, Split
from flows.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijection",
    "Compose",
    "DenseFlowConfig",
    "DequantizerConfig",
    "FlowConfig",
    "FlowModel",
    "InvConv1x1",
    "LearnedTopPrior",
    "Split",
    "SplitConfig",
    "Squeeze",
    "build_flow",
    "initialize_actnorm",
    "training_loss",
]
