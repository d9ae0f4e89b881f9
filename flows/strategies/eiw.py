"""EIW-Flow Shuffle split (arXiv 2407.04958), as its authors' code trains it (studying910/EIW-Flow,
``DIW-Flow/experiments/image/model/flow_modules.py``: ``WeightGenerator``, ``InvertibleTransition``;
``SENet.py``: ``SELayer``).

Before the split, a generator network produces channel weights w = softmax(g) over the C channels of
the split input; the channels are sorted by w, descending: the first half continues, the second half
is factored out. The permutation is a function of parameters (or of a held buffer), so decode and
sample rebuild it with no data; its log-det is 0.

The sort passes no gradient to w. w learns through a regulariser that ties it to a
squeeze-and-excitation head's per-sample attention s_b (B, C) computed from the features:

    reference: R = sum_j w_j (log w_j - mean_b s_bj)
        = torch.nn.KLDivLoss(reduction="batchmean")(s, w) exactly as the authors call it (they pass
        probabilities s where KLDivLoss expects log-probabilities).
    kl:        R = KL(w || q) = sum_j w_j (log w_j - log q_j),  q = mean_b s_b / sum_j mean_b s_bj

The authors' form (every default here): the generator reads the scalar channel count C through a
bias-free Linear(1, C//2)-ReLU-Linear(C//2, C); the SE head is bias-free, reduction 16, ends in a
softmax over channels, and reads the *permuted, not detached* tensor, so s_bi belongs to the channel
at sorted position i while w_i belongs to input channel i (the authors pair them by index), and
sigma * R reaches the flow's own features: that is what makes sigma trade likelihood against the
regulariser. The alternatives (``se_input="aligned"``, ``se_detach``, ``se_activation="sigmoid"``,
``generator="code"``, ``se_bias``) reproduce this project's first Shuffle for comparison;
docs/model.md lists every difference.

Stabilisers (ours; the authors re-sort on every step and the kept set churns): ``ema`` sorts an
exponential average of the logits; ``hysteresis`` changes the held order only when a factored-out
channel's logit beats a kept channel's by ``hysteresis_margin``. Both update at ``advance`` (once per
optimizer step) into the ``held_perm`` buffer, which is also where ``freeze`` puts the order.

Opt-in forms (ours, issue 24; the math and the reasons are in docs/model.md, "Shuffle forms"):
``generator_input`` "normalized" (the scalar 1), "log" (log C) or "none" (free logits) instead of the
raw count C, which saturates the softmax at DenseFlow's widths; ``target: entropy`` ties w to the
channels' Gaussian entropy 0.5 log(2 pi e Var x_j) instead of the SE attention, and
``target_temperature`` T divides the target's logits (the attention target mean_b s_b is uniform to
within about 1/C; T << 1 lets its differences decide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.strategies.base import FreezableStrategy, StrategyConfig, kept_fraction_of_first_half
from flows.strategies.eiw_parts import (
    CodeGenerator,
    CountGenerator,
    FreeLogits,
    SqueezeExcitation,
    channel_entropy,
    generator_input_value,
    kendall_tau,
    log_attention,
    shuffle_regularizer,
    sort_descending,
    target_regularizer,
)

# The churn diagnostic is an exponentially weighted share of steps whose kept set changed, over about
# the last 1 / (1 - CHURN_MOMENTUM) = 100 optimizer steps; it lives in buffers, so it survives a resume.
CHURN_MOMENTUM = 0.99


_EIW_CHOICES = {
    "regularizer": ("reference", "kl"),
    "generator": ("count", "code"),
    "generator_input": ("count", "normalized", "log", "none"),
    "se_activation": ("softmax", "sigmoid"),
    "se_input": ("permuted", "aligned"),
    "target": ("attention", "entropy"),
    "stabilizer": ("none", "ema", "hysteresis"),
}


@dataclass(kw_only=True)
class EIWConfig(StrategyConfig):
    """The EIW Shuffle's knobs; every default is the authors' form (docs/model.md, "Split strategies"),
    the alternatives are this project's first Shuffle and the opt-in forms of issue 24.

    regularizer: "reference" (sum_j w_j (log w_j - t_j): the authors' KLDivLoss(batchmean)(s, w))
        or "kl" (KL(w || q), q the normalised target).
    generator: "count" (authors: a scalar through a bias-free MLP) or "code" (a learned random code
        through Linear-tanh-Linear).
    generator_input: what the count generator reads: "count" (authors: the channel count C; its
        logits grow like C and the softmax saturates at C ~ 100), "normalized" (1, i.e. C / C),
        "log" (log C) or "none" (no network: C free logits, initialised as "normalized" would be).
    generator_hidden: generator width; null = C // 2 (the authors').
    se_reduction: squeeze-and-excitation reduction; its hidden width is max(1, C // se_reduction).
    se_activation: "softmax" over channels (authors) or "sigmoid".
    se_input: "permuted" (authors: the sorted tensor, paired with w by index) or "aligned" (the input
        before the sort, so s_j and w_j belong to the same channel).
    se_detach: feed the SE head a detached tensor (then sigma * R never reaches the flow's features,
        and with Adam sigma has almost no effect). The authors do not detach.
    se_bias: biases in the SE head (the authors' has none).
    target: what w is tied to: "attention" (authors: t = mean_b s_b of the SE head) or "entropy"
        (t_j = 0.5 log(2 pi e Var x_j), each input channel's Gaussian entropy over batch and positions;
        no SE head is used).
    target_temperature: T > 0 divides the target's logits, t / T (1 = the authors').
    freeze_after_steps: fix the permutation once this many optimizer steps are done; null never.
    stabilizer: "none" (authors: re-sort every step), "ema" (sort an EMA of the logits) or
        "hysteresis" (the kept set changes only when a logit wins by ``hysteresis_margin``).
    ema_momentum: momentum of the "ema" stabiliser.
    hysteresis_margin: logit margin of the "hysteresis" stabiliser.
    """

    strategy: Literal["eiw"] = "eiw"
    regularizer: Literal["reference", "kl"] = "reference"
    generator: Literal["count", "code"] = "count"
    generator_input: Literal["count", "normalized", "log", "none"] = "count"
    generator_hidden: int | None = None
    se_reduction: int = 16
    se_activation: Literal["softmax", "sigmoid"] = "softmax"
    se_input: Literal["permuted", "aligned"] = "permuted"
    se_detach: bool = False
    se_bias: bool = False
    target: Literal["attention", "entropy"] = "attention"
    target_temperature: float = 1.0
    freeze_after_steps: int | None = None
    stabilizer: Literal["none", "ema", "hysteresis"] = "none"
    ema_momentum: float = 0.99
    hysteresis_margin: float = 1.0

    NAMES: ClassVar[tuple[str, ...]] = ("eiw",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, choices in _EIW_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: unknown {getattr(self, name)!r}; choose one of {choices}")
        if self.generator == "code" and self.generator_input != "count":
            raise ValueError(
                f"generator_input: {self.generator_input!r} applies to generator 'count'; the 'code' "
                "generator reads its learned code"
            )
        if self.freeze_after_steps is not None and self.freeze_after_steps < 0:
            raise ValueError(f"freeze_after_steps: must be >= 0 or null, got {self.freeze_after_steps}")
        if self.se_reduction < 1:
            raise ValueError(f"se_reduction: must be >= 1, got {self.se_reduction}")
        if self.generator_hidden is not None and self.generator_hidden < 1:
            raise ValueError(f"generator_hidden: must be >= 1 or null, got {self.generator_hidden}")
        if not 0.0 < self.target_temperature < math.inf:
            raise ValueError(
                f"target_temperature: must be a finite number > 0, got {self.target_temperature}"
            )
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum: must be in [0, 1), got {self.ema_momentum}")
        if not 0.0 <= self.hysteresis_margin < math.inf:
            raise ValueError(f"hysteresis_margin: must be a finite number >= 0, got {self.hysteresis_margin}")

    def build(self, num_channels: int, height: int, width: int) -> EIWShuffleSplit:
        return EIWShuffleSplit(num_channels, self)


class EIWShuffleSplit(FreezableStrategy):
    """x (B, C, H, W) -> x[:, perm], perm = argsort(w, descending); a per-channel permutation.

    Without a stabiliser and unfrozen (the authors' form) the permutation is recomputed from the
    parameters on every call, so evaluating or sampling a checkpoint uses the permutation of the
    parameters being evaluated. Frozen or stabilised, it is the ``held_perm`` buffer.
    """

    def __init__(self, num_channels: int, cfg: EIWConfig | None = None, **knobs: object) -> None:
        super().__init__()  # configured by ``cfg`` or (tests, scripts) by EIWConfig's knobs as keywords
        cfg = cfg if cfg is not None else EIWConfig(**knobs)
        self.regularizer_form = cfg.regularizer
        self.num_keep = num_channels // 2
        self.se_activation = cfg.se_activation
        self.se_input = cfg.se_input
        self.se_detach = cfg.se_detach
        self.target = cfg.target
        self.target_temperature = cfg.target_temperature
        self.freeze_after_steps = cfg.freeze_after_steps
        self.stabilizer = cfg.stabilizer
        self.ema_momentum = cfg.ema_momentum
        self.hysteresis_margin = cfg.hysteresis_margin
        hidden = cfg.generator_hidden or max(1, num_channels // 2)
        self.generator_kind = cfg.generator
        if cfg.generator == "code":
            self.generator = CodeGenerator(num_channels, hidden)
        elif cfg.generator_input == "none":
            self.generator = FreeLogits(num_channels, hidden)
        else:
            value = generator_input_value(num_channels, cfg.generator_input)
            self.generator = CountGenerator(num_channels, hidden, input_value=value)
        # Built also for target "entropy" (unread there): same random draws and state_dict keys.
        self.attention = SqueezeExcitation(num_channels, cfg.se_reduction, bias=cfg.se_bias)
        with torch.no_grad():
            logits = self.generator().detach().clone()
        self.register_buffer("initial_perm", sort_descending(logits))
        self.register_buffer("held_perm", self.initial_perm.clone())
        self.register_buffer("logit_ema", logits)
        self.register_buffer("last_step", torch.tensor(-1))
        self.register_buffer("last_kept", self.initial_perm[: self.num_keep].sort().values)
        self.register_buffer("churn_ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("num_transitions", torch.tensor(0))
        self.register_buffer("num_kept_changes", torch.tensor(0))
        self._last_regularization: Tensor | None = None
        self._seen_step: int | None = None  # last_step's value, once read (see ``advance``)

    # ------------------------------------------------------------------ the permutation
    def channel_log_weights(self) -> Tensor:
        """log w = log_softmax(g), shape (C,)."""
        return F.log_softmax(self.generator(), dim=0)

    @property
    def _holds_perm(self) -> bool:
        return self._is_frozen or self.stabilizer != "none"

    def permutation(self) -> Tensor:
        """The channel permutation (C,) int64: output channel i is input channel perm[i]."""
        if self._holds_perm:
            return self.held_perm
        return sort_descending(self.generator())

    def channel_order(self, num_channels: int) -> Tensor:
        return self.permutation()

    def permute(self, x: Tensor) -> Tensor:
        logits = self.generator()
        perm = self.held_perm if self._holds_perm else sort_descending(logits)
        y = x.index_select(1, perm)
        log_w = F.log_softmax(logits, dim=0)
        if self.target == "entropy":
            target = channel_entropy(x).to(log_w.dtype) / self.target_temperature
            self._last_regularization = target_regularizer(log_w, target, self.regularizer_form)
            return y
        se_in = y if self.se_input == "permuted" else x
        if self.se_detach:
            se_in = se_in.detach()
        log_s = log_attention(self.attention(se_in), self.se_activation)
        self._last_regularization = shuffle_regularizer(
            log_w, log_s, self.regularizer_form, self.target_temperature
        )
        return y

    def unpermute(self, y: Tensor) -> Tensor:
        return y.index_select(1, torch.argsort(self.permutation()))

    def regularization(self) -> Tensor | None:
        """The unweighted regulariser of the last forward pass (scalar); None before any forward."""
        return self._last_regularization

    # ------------------------------------------------------------------ training schedule
    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the permutation to the current one (a buffer); the regulariser keeps being computed."""
        self.held_perm.copy_(self.permutation())
        self._mark_frozen()

    @torch.no_grad()
    def _stabilise(self) -> None:
        logits = self.generator().detach()
        if self.stabilizer == "ema":
            self.logit_ema.mul_(self.ema_momentum).add_(logits, alpha=1.0 - self.ema_momentum)
            self.held_perm.copy_(sort_descending(self.logit_ema))
        elif self.stabilizer == "hysteresis":
            kept = torch.zeros_like(logits)
            kept[self.held_perm[: self.num_keep]] = 1.0
            candidate = sort_descending(logits + self.hysteresis_margin * kept)
            # Decided on the device (no host read per step): a new order only when the kept set changed.
            moved = (
                candidate[: self.num_keep].sort().values != self.held_perm[: self.num_keep].sort().values
            ).any()
            self.held_perm.copy_(torch.where(moved, candidate, self.held_perm))

    def advance(self, step: int) -> None:
        """Once per optimizer step (idempotent for a given step): freeze at the configured step, update
        a stabilised order, and record whether the kept set changed (for ``diagnostics``)."""
        # The last step seen, mirrored on the host so that an ordinary step reads nothing back from
        # the device; the buffer is read once after construction or a state_dict load.
        seen = self._seen_step if self._seen_step is not None else int(self.last_step)
        if step <= seen:
            self._seen_step = seen
            return
        self._seen_step = step
        self.last_step.fill_(step)
        if not self._is_frozen and self.freeze_after_steps is not None and step >= self.freeze_after_steps:
            self.freeze()
        if not self._is_frozen and self.stabilizer != "none":
            self._stabilise()
        with torch.no_grad():
            kept = self.permutation()[: self.num_keep].sort().values
            changed = (kept != self.last_kept).any()  # on the device: read at log steps only
            self.last_kept.copy_(kept)
            step_churn = changed.to(self.churn_ema.dtype) * (1.0 - CHURN_MOMENTUM)
            self.churn_ema.mul_(CHURN_MOMENTUM).add_(step_churn)
            self.num_transitions.add_(1)
            self.num_kept_changes.add_(changed.to(self.num_kept_changes.dtype))

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """churn: share of recent steps (about the last 100, exponentially weighted and debiased)
        whose kept set changed; kept_changes: how often it changed in all; kendall_tau of the order
        against the initial one; w_entropy: entropy of w in nats (log C is uniform); static_overlap:
        share of the kept channels that static would keep too."""
        log_w = self.channel_log_weights()
        order = self.permutation()
        n = int(self.num_transitions)
        churn = float(self.churn_ema) / (1.0 - CHURN_MOMENTUM**n) if n else 0.0
        return {
            "churn": churn,
            "kept_changes": float(self.num_kept_changes),
            "kendall_tau": kendall_tau(order, self.initial_perm),
            "w_entropy": float(-(log_w.exp() * log_w).sum().item()),
            "static_overlap": kept_fraction_of_first_half(order, self.num_keep),
        }

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._seen_step = None  # last_step comes from the state_dict: read it again
        if prefix + "generator.code" in state_dict and self.generator_kind != "code":
            raise ValueError(
                f"{prefix.rstrip('.')}: this checkpoint holds this project's first EIW Shuffle (a learned "
                "code generator, sigmoid SE on the detached input). Load it with model.split set to "
                "{generator: code, se_activation: sigmoid, se_input: aligned, se_detach: true, "
                "se_bias: true, se_reduction: 4, generator_hidden: 32}, or retrain with the authors' form."
            )
        if prefix + "frozen_perm" in state_dict:  # checkpoints before held_perm and the stabilisers
            state_dict[prefix + "held_perm"] = state_dict.pop(prefix + "frozen_perm")
            for name in (
                "initial_perm",
                "logit_ema",
                "last_step",
                "last_kept",
                "churn_ema",
                "num_transitions",
                "num_kept_changes",
            ):
                state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
