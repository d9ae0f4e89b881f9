"""LCMA split: likelihood-contribution based factorization (Das, Abbeel & Spanos, arXiv 1908.01686).

Each dimension (c, h, w) of a split's input x gets a likelihood contribution, measured on training
batches and averaged over the batch:

    contribution[c,h,w] = mean_b log N(x_bchw; 0, 1)                      (its log-prior term)
                        + sum_steps [ actnorm.log_scale_c + invconv.log|s_c| ]
                        + sum_steps mean_b log sigmoid(raw_bchw)            (affine coupling, c >= C/2)

i.e. the log-det terms of the level's steps attributable to the dimension by index: ActNorm and the
coupling scale are per dimension, the LU 1x1 conv's log|s_c| is attributed to channel c. Summed over
(c, h, w) the log-det part equals the level's log-det exactly (a test checks this). The log-prior term
is the density the dimension would get if it were factored out here as N(0, 1) (the split's
conditional prior only exists for the factored-out half, so it cannot rank all channels).

Contributions are an exponential running average over training batches. While warming up the split
is static (identity); ``freeze()`` then sorts the channels per spatial position by contribution into
the ``order`` buffer (C, H, W), and the permutation is the gather x[:, order[c, h, w], h, w] along the
channel axis, so the factored-out tensor keeps its (C/2, H, W) shape. With ``factor_out="low"`` the
low-contribution half is factored out; with "high", the high-contribution half. After freezing
nothing is measured any more and the order never changes; it is saved with the state_dict.

Measuring needs the level's layers: ``bind(level)`` (done by ``FlowModel.advance``) keeps plain
references to them and puts a forward hook on each affine coupling's net to read its scale logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.actnorm import ActNorm
from flows.coupling import AffineCoupling
from flows.invconv import InvConv1x1
from flows.strategies.base import FreezableStrategy, StrategyConfig, kept_fraction_of_first_half


@dataclass(kw_only=True)
class LCMAConfig(StrategyConfig):
    """LCMA's knobs (before per-strategy configs: ``lcma_warmup_steps``, ``lcma_factor_out``,
    ``lcma_momentum``; those keys are still read).

    warmup_steps: steps of static split while contributions accumulate, then the order is frozen.
    factor_out: which contributions are factored out at each split, "low" or "high".
    momentum: momentum of the running (exponential) average of contributions.
    """

    strategy: Literal["lcma"] = "lcma"
    warmup_steps: int = 100
    factor_out: Literal["low", "high"] = "low"
    momentum: float = 0.99

    NAMES: ClassVar[tuple[str, ...]] = ("lcma",)
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        "lcma_warmup_steps": "warmup_steps",
        "lcma_factor_out": "factor_out",
        "lcma_momentum": "momentum",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor_out not in ("low", "high"):
            raise ValueError(f"factor_out: unknown {self.factor_out!r}; choose one of ('low', 'high')")
        if isinstance(self.warmup_steps, bool) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps: must be >= 1, got {self.warmup_steps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")

    def build(self, num_channels: int, height: int, width: int) -> LCMASplit:
        return LCMASplit(num_channels, height, width, self)


class LCMASplit(FreezableStrategy):
    """x (B, C, H, W) -> x.gather(1, order) with order (C, H, W) a per-position channel permutation.

    Configured by ``cfg`` or, for tests and scripts, by ``LCMAConfig``'s knobs as keywords."""

    def __init__(
        self, num_channels: int, height: int, width: int, cfg: LCMAConfig | None = None, **knobs: object
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else LCMAConfig(**knobs)
        self.warmup_steps = cfg.warmup_steps
        self.factor_out = cfg.factor_out
        self.momentum = cfg.momentum
        shape = (num_channels, height, width)
        self.register_buffer("running_contribution", torch.zeros(shape))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        identity = torch.arange(num_channels).view(-1, 1, 1).expand(shape).contiguous()
        self.register_buffer("order", identity)
        # Plain lists, not submodules: the level's layers belong to the model, not to this strategy.
        self._actnorms: list[ActNorm] = []
        self._invconvs: list[InvConv1x1] = []
        self._couplings: list[AffineCoupling] = []
        self._bound_to: list[nn.Module] = []
        self._coupling_log_det: Tensor | None = None  # (C, H, W), batch mean of this forward

    # ------------------------------------------------------------------ measuring
    def bind(self, level: nn.Module) -> None:
        """Measure the contributions of ``level``, the steps whose output this split receives."""
        if self._bound_to and self._bound_to[0] is level:
            return
        assert not self._bound_to, "an LCMA split measures exactly one level"
        self._bound_to.append(level)
        level.register_forward_pre_hook(self._start_level)
        if not getattr(level, "log_det_by_channel", True):
            return  # e.g. a DenseFlow level: its channels are not the split input's (log-prior only)
        for module in level.modules():
            if isinstance(module, ActNorm):
                self._actnorms.append(module)
            elif isinstance(module, InvConv1x1):
                self._invconvs.append(module)
            elif isinstance(module, AffineCoupling):
                self._couplings.append(module)
                module.net.register_forward_hook(self._record_coupling)

    @property
    def is_bound(self) -> bool:
        return bool(self._bound_to)

    def _measuring(self) -> bool:
        return self.training and torch.is_grad_enabled() and not self._is_frozen

    def _start_level(self, level: nn.Module, args: tuple) -> None:
        self._coupling_log_det = None

    def _record_coupling(self, net: nn.Module, args: tuple, h: Tensor) -> None:
        # Mirrors AffineCoupling: raw = h[:, 1::2] + 2, scale = sigmoid(raw), per-dim log-det
        # log sigmoid(raw) = -softplus(-raw) on channels num_a: (the sum test guards this coupling).
        if not self._measuring():
            return
        coupling = next(c for c in self._couplings if c.net is net)
        raw = h.detach()[:, 1::2].to(self.running_contribution.dtype) + 2.0
        per_dim = -F.softplus(-raw).mean(dim=0)
        if self._coupling_log_det is None:
            c, height, width = self.order.shape
            self._coupling_log_det = per_dim.new_zeros((c, height, width))
        self._coupling_log_det[coupling.num_a :] += per_dim

    @torch.no_grad()
    def batch_contribution(self, x: Tensor) -> Tensor:
        """The contributions (C, H, W) of one batch x (B, C, H, W) at the split input (see module doc)."""
        x = x.to(self.running_contribution.dtype)  # statistics in full precision, also under autocast
        log_prior = (-0.5 * x * x).mean(dim=0) - 0.5 * math.log(2 * math.pi)
        per_channel = log_prior.new_zeros(x.shape[1])
        for actnorm in self._actnorms:
            per_channel += actnorm.log_scale.detach().view(-1).to(x.dtype)
        for invconv in self._invconvs:
            per_channel += invconv.log_s.detach().to(x.dtype)
        contribution = log_prior + per_channel.view(-1, 1, 1)
        if self._coupling_log_det is not None:
            contribution = contribution + self._coupling_log_det
        return contribution

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        batch = self.batch_contribution(x)
        self._coupling_log_det = None
        # Exponential average, debiased like Adam's moments so early batches are not pulled to 0.
        self.num_updates += 1
        self.running_contribution.mul_(self.momentum).add_(batch, alpha=1.0 - self.momentum)

    def contribution(self) -> Tensor:
        """The running average of the contributions (C, H, W), debiased; zeros before any update."""
        n = self.num_updates.clamp(min=1).to(self.running_contribution.dtype)
        return self.running_contribution / (1.0 - self.momentum**n)

    # ------------------------------------------------------------------ the permutation
    @staticmethod
    def _gather_channels(x: Tensor, order: Tensor) -> Tensor:
        """y[b, c, h, w] = x[b, order[c, h, w], h, w], as one index_select over the flattened (C*H*W)
        axis: unlike ``gather``, its backward keeps only the index, not a copy of x."""
        _, height, width = order.shape
        position = torch.arange(height * width, device=order.device).view(1, height, width)
        flat_index = (order * (height * width) + position).reshape(-1)
        return x.reshape(x.shape[0], -1).index_select(1, flat_index).view(x.shape)

    def channel_order(self, num_channels: int) -> Tensor:
        return self.order

    def permute(self, x: Tensor) -> Tensor:
        if self.is_bound and self._measuring():
            self._update(x)
        if not self._is_frozen:
            return x
        return self._gather_channels(x, self.order)

    def unpermute(self, y: Tensor) -> Tensor:
        if not self._is_frozen:
            return y
        return self._gather_channels(y, torch.argsort(self.order, dim=0))

    # ------------------------------------------------------------------ training schedule
    @torch.no_grad()
    def freeze(self) -> None:
        """Sort channels per position by contribution (stable, so ties keep the channel order)."""
        descending = self.factor_out == "low"  # kept (first) half = the end that is not factored out
        self.order.copy_(torch.sort(self.contribution(), dim=0, descending=descending, stable=True).indices)
        self._mark_frozen()

    def advance(self, step: int) -> None:
        """Called with the number of completed optimizer steps; freezes once warm-up is over."""
        if not self._is_frozen and step >= self.warmup_steps:
            self.freeze()

    def diagnostics(self) -> dict[str, float]:
        """static_overlap: share of the kept (c, h, w) entries that static would keep too (1 while
        warming up); frozen: 1 once the order is fixed."""
        return {
            "static_overlap": kept_fraction_of_first_half(self.order, self.order.shape[0] // 2),
            "frozen": float(self._is_frozen),
        }
