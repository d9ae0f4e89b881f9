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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.strategies.base import FreezableStrategy, kept_fraction_of_first_half

# The churn diagnostic is an exponentially weighted share of steps whose kept set changed, over about
# the last 1 / (1 - CHURN_MOMENTUM) = 100 optimizer steps; it lives in buffers, so it survives a resume.
CHURN_MOMENTUM = 0.99


class CountGenerator(nn.Module):
    """The authors' WeightGenerator: the scalar C through Linear(1, H)-ReLU-Linear(H, C), bias-free."""

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.fc = nn.Sequential(
            nn.Linear(1, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, num_channels, bias=False)
        )

    def forward(self) -> Tensor:
        weight = self.fc[0].weight
        # Always in the parameters' precision: a permutation sorted from bf16 logits under autocast in
        # training could differ from the float32 one that decode and sample rebuild outside it.
        with torch.autocast(weight.device.type, enabled=False):
            return self.fc(weight.new_full((1,), float(self.num_channels)))


class CodeGenerator(nn.Module):
    """This project's first generator: a learned random code through Linear-tanh-Linear."""

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        self.code = nn.Parameter(torch.randn(hidden))
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, num_channels))

    def forward(self) -> Tensor:
        with torch.autocast(self.code.device.type, enabled=False):
            return self.net(self.code)


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018: global average pool -> FC -> ReLU -> FC. x (B, C, H, W) -> logits a (B, C).

    The attention is s = softmax(a) (authors) or sigmoid(a); logits are returned so log s stays exact.
    """

    def __init__(self, num_channels: int, reduction: int, *, bias: bool) -> None:
        super().__init__()
        hidden = max(1, num_channels // reduction)  # the authors' C // 16 is 0 for C < 16
        self.fc_in = nn.Linear(num_channels, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, num_channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.relu(self.fc_in(x.mean(dim=(2, 3)))))


def log_attention(attention_logits: Tensor, activation: str) -> Tensor:
    """log s (B, C) from SE logits: log-softmax over channels or log-sigmoid, never log(0)."""
    if activation == "softmax":
        return F.log_softmax(attention_logits, dim=1)
    return F.logsigmoid(attention_logits)


def shuffle_regularizer(log_w: Tensor, log_s: Tensor, form: str) -> Tensor:
    """The Shuffle regulariser of one split: log_w (C,) log-softmax weights, log s (B, C) -> ().

    reference: sum_j w_j (log w_j - mean_b s_bj)   (KLDivLoss(batchmean)(s, w), see module doc)
    kl: sum_j w_j (log w_j - log q_j), q_j = mean_b s_bj / sum_k mean_b s_bk, with
        log mean_b s_bj = logsumexp_b log s_bj - log B.
    """
    w = log_w.exp()
    if form == "reference":
        return (w * (log_w - log_s.exp().mean(dim=0))).sum()
    if form == "kl":
        log_mean_s = torch.logsumexp(log_s, dim=0) - math.log(log_s.shape[0])
        log_q = log_mean_s - torch.logsumexp(log_mean_s, dim=0)
        return (w * (log_w - log_q)).sum()
    raise ValueError(f"split.regularizer: unknown {form!r}; choose 'reference' or 'kl'")


def sort_descending(logits: Tensor) -> Tensor:
    """Stable descending sort of logits (softmax is monotone; logits do not underflow to equal zeros)."""
    return torch.sort(logits.detach(), descending=True, stable=True).indices


def kendall_tau(order_a: Tensor, order_b: Tensor) -> float:
    """Kendall's tau between two orders (permutations of 0..C-1): 1 equal, -1 reversed."""
    n = order_a.numel()
    if n < 2:
        return 1.0
    rank_a = torch.argsort(order_a).to(torch.float64)
    rank_b = torch.argsort(order_b).to(torch.float64)
    da = torch.sign(rank_a.view(-1, 1) - rank_a.view(1, -1))
    db = torch.sign(rank_b.view(-1, 1) - rank_b.view(1, -1))
    return ((da * db).sum() / (n * (n - 1))).item()


class EIWShuffleSplit(FreezableStrategy):
    """x (B, C, H, W) -> x[:, perm], perm = argsort(w, descending); a per-channel permutation.

    Without a stabiliser and unfrozen (the authors' form) the permutation is recomputed from the
    parameters on every call, so evaluating or sampling a checkpoint uses the permutation of the
    parameters being evaluated. Frozen or stabilised, it is the ``held_perm`` buffer.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        regularizer: str = "reference",
        generator: str = "count",
        generator_hidden: int | None = None,
        se_reduction: int = 16,
        se_activation: str = "softmax",
        se_input: str = "permuted",
        se_detach: bool = False,
        se_bias: bool = False,
        freeze_after_steps: int | None = None,
        stabilizer: str = "none",
        ema_momentum: float = 0.99,
        hysteresis_margin: float = 1.0,
    ) -> None:
        super().__init__()
        if regularizer not in ("reference", "kl"):
            raise ValueError(f"split.regularizer: unknown {regularizer!r}; choose 'reference' or 'kl'")
        self.regularizer_form = regularizer
        self.num_keep = num_channels // 2
        self.se_activation = se_activation
        self.se_input = se_input
        self.se_detach = se_detach
        self.freeze_after_steps = freeze_after_steps
        self.stabilizer = stabilizer
        self.ema_momentum = ema_momentum
        self.hysteresis_margin = hysteresis_margin
        hidden = generator_hidden or max(1, num_channels // 2)
        self.generator_kind = generator
        self.generator = (CountGenerator if generator == "count" else CodeGenerator)(num_channels, hidden)
        self.attention = SqueezeExcitation(num_channels, se_reduction, bias=se_bias)
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
        se_in = y if self.se_input == "permuted" else x
        if self.se_detach:
            se_in = se_in.detach()
        log_s = log_attention(self.attention(se_in), self.se_activation)
        self._last_regularization = shuffle_regularizer(
            F.log_softmax(logits, dim=0), log_s, self.regularizer_form
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
