"""EIW-Flow Shuffle split (arXiv 2407.04958, after its authors' DenseFlow + Shuffle code).

Before the split, a small generator network produces channel weights w = softmax(g) over the C
channels of the split input. The channels are sorted by w, descending: the first half continues, the
second half is factored out. The permutation is a function of the generator's parameters only (or of
a frozen buffer), so decode and sample rebuild it with no data; its log-det is 0.

The sort passes no gradient to w. w learns only through a regulariser that ties it to a
squeeze-and-excitation head's per-sample attention s_b = sigmoid(SE(x_b)) on the unpermuted split
input (w and s are indexed by the same, original channel j):

    reference: R = sum_j w_j (log w_j - mean_b s_bj)      (what the authors' code optimises;
               minimised by w = softmax(mean_b s_b))
    kl:        R = KL(w || q) = sum_j w_j (log w_j - log q_j),  q = mean_b s_b / sum_j mean_b s_bj

The SE head sees the features detached: the regulariser trains the generator and the SE head and
never pushes the flow's own features around. Logs are always log-softmax / log-sigmoid /
logsumexp, so a peaked or uniform w never produces NaN; the sort runs on the logits g (softmax is
monotone, and logits do not underflow to equal zeros) and is stable, so ties go to the lower index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.strategies.base import SplitStrategy


class ChannelWeightGenerator(nn.Module):
    """A learned code through a two-layer MLP: () -> channel logits g (C,); w = softmax(g)."""

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        self.code = nn.Parameter(torch.randn(hidden))
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, num_channels))

    def forward(self) -> Tensor:
        # Always in the parameters' precision: a permutation sorted from bf16 logits under autocast in
        # training could differ from the float32 one that decode and sample rebuild outside it.
        with torch.autocast(self.code.device.type, enabled=False):
            return self.net(self.code)


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018: global average pool -> FC -> ReLU -> FC. x (B, C, H, W) -> logits a (B, C).

    The attention is s = sigmoid(a); logits are returned so that log s = logsigmoid(a) stays exact.
    """

    def __init__(self, num_channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, num_channels // reduction)
        self.fc_in = nn.Linear(num_channels, hidden)
        self.fc_out = nn.Linear(hidden, num_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.relu(self.fc_in(x.mean(dim=(2, 3)))))


def shuffle_regularizer(log_w: Tensor, attention_logits: Tensor, form: str) -> Tensor:
    """The Shuffle regulariser of one split: log_w (C,) log-softmax weights, logits a (B, C) -> ().

    reference: sum_j w_j (log w_j - mean_b sigmoid(a_bj)).
    kl: sum_j w_j (log w_j - log q_j), q_j = mean_b s_bj / sum_k mean_b s_bk, with
        log mean_b s_bj = logsumexp_b logsigmoid(a_bj) - log B.
    """
    w = log_w.exp()
    if form == "reference":
        return (w * (log_w - torch.sigmoid(attention_logits).mean(dim=0))).sum()
    if form == "kl":
        log_mean_s = torch.logsumexp(F.logsigmoid(attention_logits), dim=0) - math.log(
            attention_logits.shape[0]
        )
        log_q = log_mean_s - torch.logsumexp(log_mean_s, dim=0)
        return (w * (log_w - log_q)).sum()
    raise ValueError(f"split.regularizer: unknown {form!r}; choose 'reference' or 'kl'")


class EIWShuffleSplit(SplitStrategy):
    """x (B, C, H, W) -> x[:, perm], perm = argsort(w, descending); a per-channel permutation.

    Freezing: ``freeze()`` (called by ``flows.strategies.advance`` once ``freeze_after_steps`` optimizer
    steps are done) copies the current permutation into the ``frozen_perm`` buffer; from then on that
    buffer is the permutation, and it is saved and restored with the state_dict. Unfrozen (the default),
    the permutation is recomputed from the parameters on every call, so evaluating or sampling a
    checkpoint always uses the permutation of the parameters being evaluated.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        regularizer: str = "reference",
        freeze_after_steps: int | None = None,
        se_reduction: int = 4,
        generator_hidden: int = 32,
    ) -> None:
        super().__init__()
        if regularizer not in ("reference", "kl"):
            raise ValueError(f"split.regularizer: unknown {regularizer!r}; choose 'reference' or 'kl'")
        self.regularizer_form = regularizer
        self.freeze_after_steps = freeze_after_steps
        self.generator = ChannelWeightGenerator(num_channels, generator_hidden)
        self.attention = SqueezeExcitation(num_channels, se_reduction)
        self.register_buffer("frozen_perm", torch.arange(num_channels))
        self.register_buffer("frozen", torch.tensor(False))
        # Python mirror of the ``frozen`` buffer: reading a CUDA bool every forward would sync the GPU.
        self._is_frozen = False
        self._last_regularization: Tensor | None = None
        self.register_load_state_dict_post_hook(EIWShuffleSplit._sync_frozen_flag)

    @staticmethod
    def _sync_frozen_flag(module: EIWShuffleSplit, incompatible_keys: object) -> None:
        module._is_frozen = bool(module.frozen)

    # ------------------------------------------------------------------ the permutation
    def channel_log_weights(self) -> Tensor:
        """log w = log_softmax(g), shape (C,)."""
        return F.log_softmax(self.generator(), dim=0)

    def _sorted_by_weight(self, logits: Tensor) -> Tensor:
        return torch.sort(logits.detach(), descending=True, stable=True).indices

    def permutation(self) -> Tensor:
        """The channel permutation (C,) int64: output channel i is input channel perm[i]."""
        if self._is_frozen:
            return self.frozen_perm
        return self._sorted_by_weight(self.generator())

    def permute(self, x: Tensor) -> Tensor:
        logits = self.generator()
        log_w = F.log_softmax(logits, dim=0)
        self._last_regularization = shuffle_regularizer(
            log_w, self.attention(x.detach()), self.regularizer_form
        )
        perm = self.frozen_perm if self._is_frozen else self._sorted_by_weight(logits)
        return x.index_select(1, perm)

    def unpermute(self, y: Tensor) -> Tensor:
        return y.index_select(1, torch.argsort(self.permutation()))

    def regularization(self) -> Tensor | None:
        """The unweighted regulariser of the last forward pass (scalar); None before any forward."""
        return self._last_regularization

    # ------------------------------------------------------------------ training schedule
    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the permutation to the current one (a buffer); the regulariser keeps being computed."""
        self.frozen_perm.copy_(self.permutation())
        self.frozen.fill_(True)
        self._is_frozen = True

    def advance(self, step: int) -> None:
        """Called with the number of completed optimizer steps; freezes once it reaches the setting."""
        if not self._is_frozen and self.freeze_after_steps is not None and step >= self.freeze_after_steps:
            self.freeze()
