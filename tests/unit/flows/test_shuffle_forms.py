"""The opt-in forms of the EIW Shuffle (issue 24) do what docs/model.md, "Shuffle forms", claims:
a generator input that does not saturate with width, targets that are not uniform, an entropy target
that orders channels by their entropy, and weights paired with the authors' form at one seed. Their
exactness (inverse, log-det, gradients) is in test_strategies.py's harness (EIW_OPTIONS)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flows import FlowConfig, SplitConfig, build_flow
from flows.strategies import EIWShuffleSplit
from flows.strategies.eiw_parts import channel_entropy, log_attention, shuffle_regularizer, target_regularizer


def w_entropy(strategy: EIWShuffleSplit) -> float:
    log_w = strategy.channel_log_weights().detach()
    return float(-(log_w.exp() * log_w).sum())


@pytest.mark.parametrize("form", ["normalized", "log", "none"])
def test_generator_input_does_not_saturate_at_denseflow_width(form: str) -> None:
    """At C = 176 the authors' count input saturates the softmax (w is one-hot, entropy ~ 0)."""
    for seed in range(3):
        torch.manual_seed(seed)
        authors = w_entropy(EIWShuffleSplit(176))
        torch.manual_seed(seed)
        ours = w_entropy(EIWShuffleSplit(176, generator_input=form))
        assert authors < 0.1 * math.log(176)
        assert ours > 0.8 * math.log(176)


def test_input_forms_draw_the_same_weights_as_the_authors() -> None:
    """Paired seeds: "normalized" and "log" change the generator's input, not its weights; "none"
    draws the same numbers for its logits, so every other weight of the model is the authors' too."""
    def state(**knobs):
        cfg = FlowConfig(image_shape=(3, 8, 8), num_levels=2, num_steps=1, hidden_channels=8, init_seed=3,
                         split=SplitConfig(strategy="eiw", **knobs))  # fmt: skip
        return build_flow(cfg).state_dict()

    authors = state()
    for knobs in ({"generator_input": "normalized"}, {"generator_input": "log"}, {"target": "entropy"}):
        other = state(**knobs)
        assert list(other) == list(authors)
        order_buffers = ("perm", "logit_ema", "last_kept")  # follow the (different) logits
        same = [k for k in authors if not any(b in k for b in order_buffers)]
        assert all(torch.equal(other[k], authors[k]) for k in same)
    free = state(generator_input="none")
    shared = [k for k in authors if ".generator." not in k and "perm" not in k and "logit" not in k
              and "last_kept" not in k]  # fmt: skip
    assert all(torch.equal(free[k], authors[k]) for k in shared)


def test_temperature_makes_the_attention_target_informative() -> None:
    """The authors' minimiser softmax(mean_b s_b) is uniform to within ~1/C; kl with T = 0.1 (q
    proportional to (mean_b s_b)^10) spreads the same attention over a factor of several."""
    torch.manual_seed(0)
    strategy = EIWShuffleSplit(48, se_input="aligned")
    x = torch.randn(16, 48, 4, 4) * torch.linspace(0.5, 2.0, 48).view(1, -1, 1, 1)
    log_s = log_attention(strategy.attention(x), "softmax").detach()
    mean_s = log_s.exp().mean(dim=0)
    authors = F.softmax(mean_s, dim=0)
    sharp = F.softmax(mean_s.log() / 0.1, dim=0)
    assert float(authors.max() / authors.min()) < 1.01
    assert float(sharp.max() / sharp.min()) > 3.0
    # and that is the minimiser the regulariser has: its gradient vanishes at log w = log q
    log_w = sharp.log().requires_grad_(True)
    (grad,) = torch.autograd.grad(shuffle_regularizer(F.log_softmax(log_w, 0), log_s, "kl", 0.1), log_w)
    assert grad.abs().max() < 1e-6
    # T = 1 is the authors' form, bit for bit
    lw = F.log_softmax(torch.randn(48), 0)
    for form in ("reference", "kl"):
        assert torch.equal(shuffle_regularizer(lw, log_s, form, 1.0), shuffle_regularizer(lw, log_s, form))


def test_entropy_target_orders_channels_by_their_entropy() -> None:
    """target: entropy ties w to softmax(e / T), e_j = 0.5 log(2 pi e Var x_j): trained on the
    regulariser alone, the kept half is the high-variance half."""
    torch.manual_seed(0)
    c = 8
    scale = torch.tensor([0.2, 3.0, 0.5, 2.0, 0.1, 4.0, 0.3, 1.5])  # high variance: 1, 3, 5, 7
    x = torch.randn(64, c, 4, 4) * scale.view(1, -1, 1, 1)
    e = channel_entropy(x)
    variance = x.transpose(0, 1).reshape(c, -1).var(dim=1)
    torch.testing.assert_close(e, 0.5 * torch.log(2 * math.pi * math.e * variance))
    strategy = EIWShuffleSplit(c, generator_input="normalized", target="entropy")
    optimizer = torch.optim.Adam(strategy.generator.parameters(), lr=0.05)
    for _ in range(200):
        strategy.permute(x)
        optimizer.zero_grad()
        strategy.regularization().backward()
        optimizer.step()
    assert sorted(strategy.permutation()[: c // 2].tolist()) == [1, 3, 5, 7]
    w = strategy.channel_log_weights().exp().detach()
    torch.testing.assert_close(w, F.softmax(e, dim=0), atol=0.02, rtol=0)
    assert target_regularizer(w.log(), e, "kl") < 1e-3
