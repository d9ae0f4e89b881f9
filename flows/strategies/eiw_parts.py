"""The parts of the EIW Shuffle (flows/strategies/eiw.py): the channel-weight generators, the
squeeze-and-excitation head, the regularisers that tie ``w`` to a target, and order helpers.

The math and every difference from the authors' code (studying910/EIW-Flow) are in docs/model.md,
"Split strategies" and "Shuffle forms".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def generator_input_value(num_channels: int, form: str) -> float:
    """The scalar the count generator reads: C (authors), 1 ("normalized", also "none"'s init) or log C."""
    if form == "count":
        return float(num_channels)
    if form == "log":
        return math.log(num_channels)
    return 1.0


class CountGenerator(nn.Module):
    """The authors' WeightGenerator: the scalar C through Linear(1, H)-ReLU-Linear(H, C), bias-free.

    ``input_value`` replaces C for the opt-in forms ("normalized": 1, "log": log C): the logits are
    linear in it (the MLP is bias-free and ReLU is positively homogeneous), so with C their scale grows
    with the width and their softmax saturates; with 1 it does not."""

    def __init__(self, num_channels: int, hidden: int, input_value: float | None = None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.input_value = float(num_channels) if input_value is None else float(input_value)
        self.fc = nn.Sequential(
            nn.Linear(1, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, num_channels, bias=False)
        )

    def forward(self) -> Tensor:
        weight = self.fc[0].weight
        # Always in the parameters' precision: a permutation sorted from bf16 logits under autocast in
        # training could differ from the float32 one that decode and sample rebuild outside it.
        with torch.autocast(weight.device.type, enabled=False):
            return self.fc(weight.new_full((1,), self.input_value))


class FreeLogits(nn.Module):
    """``generator_input: none``: the C logits are parameters themselves, initialised to the
    normalised count generator's output (the same random draws, so other weights stay paired)."""

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        with torch.no_grad():
            start = CountGenerator(num_channels, hidden, input_value=1.0)()
        self.logits = nn.Parameter(start.detach().clone())

    def forward(self) -> Tensor:
        return self.logits


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


def shuffle_regularizer(log_w: Tensor, log_s: Tensor, form: str, temperature: float = 1.0) -> Tensor:
    """The Shuffle regulariser of one split: log_w (C,) log-softmax weights, log s (B, C) -> ().

    reference: sum_j w_j (log w_j - mean_b s_bj / T)   (KLDivLoss(batchmean)(s, w) at T = 1)
    kl: sum_j w_j (log w_j - log q_j), q_j proportional to (mean_b s_bj)^(1/T), with
        log mean_b s_bj = logsumexp_b log s_bj - log B.
    T = 1 is the authors' (dividing by 1.0 is exact, so their form is unchanged bit for bit).
    """
    w = log_w.exp()
    if form == "reference":
        return (w * (log_w - log_s.exp().mean(dim=0) / temperature)).sum()
    if form == "kl":
        log_mean_s = (torch.logsumexp(log_s, dim=0) - math.log(log_s.shape[0])) / temperature
        log_q = log_mean_s - torch.logsumexp(log_mean_s, dim=0)
        return (w * (log_w - log_q)).sum()
    raise ValueError(f"split.regularizer: unknown {form!r}; choose 'reference' or 'kl'")


def channel_entropy(x: Tensor) -> Tensor:
    """Gaussian entropy of each channel, 0.5 log(2 pi e Var x_j) over batch and positions:
    x (B, C, H, W) -> (C,), detached (a measurement the weights are tied to, not a path for gradients).
    The maximum entropy of any density with that variance, in nats; the variance is clamped at 1e-12."""
    x = x.detach()
    var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1)
    return 0.5 * torch.log(2 * math.pi * math.e * var.clamp(min=1e-12))


def target_regularizer(log_w: Tensor, target_logits: Tensor, form: str) -> Tensor:
    """The regulariser for a per-channel target t (C,): reference sum_j w_j (log w_j - t_j), kl
    KL(w || softmax(t)); both are minimised by w = softmax(t) and differ by logsumexp(t)."""
    w = log_w.exp()
    if form == "reference":
        return (w * (log_w - target_logits)).sum()
    return (w * (log_w - F.log_softmax(target_logits, dim=0))).sum()


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
