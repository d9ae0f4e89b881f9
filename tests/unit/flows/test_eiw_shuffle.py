"""The EIW Shuffle in detail: its regulariser against hand and reference computations, how sigma
reaches the flow, the stabilisers, diagnostics and loading checkpoints of its first form. The
contract every strategy shares (permutations, exactness, sampling, freezing) is test_strategies.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flows import initialize_actnorm
from flows.strategies import EIWShuffleSplit
from tests.unit.bijection_harness import perturb_parameters
from tests.unit.flows.strategy_models import (
    eiw_strategy,
    frozen_lcma,
    images,
    set_channel_logits,
    tiny_model,
    train,
    trained,
)


def hand_regularizer(logits: list[float], attention_logits: Tensor, form: str, activation: str) -> float:
    """The regulariser from its definition, in plain Python; attention rows are indexed like w."""
    z = sum(math.exp(g) for g in logits)
    w = [math.exp(g) / z for g in logits]
    rows = attention_logits.tolist()
    if activation == "softmax":
        s_rows = [[math.exp(a) / sum(math.exp(b) for b in row) for a in row] for row in rows]
    else:
        s_rows = [[1 / (1 + math.exp(-a)) for a in row] for row in rows]
    mean_s = [sum(row[j] for row in s_rows) / len(rows) for j in range(len(logits))]
    if form == "reference":
        return sum(w[j] * (math.log(w[j]) - mean_s[j]) for j in range(len(w)))
    q = [m / sum(mean_s) for m in mean_s]
    return sum(w[j] * math.log(w[j] / q[j]) for j in range(len(w)))


@pytest.mark.parametrize("form", ["reference", "kl"])
@pytest.mark.parametrize("options", [{}, dict(se_activation="sigmoid", se_input="aligned", se_bias=True)])
def test_regularizer_equals_hand_computation(form: str, options: dict) -> None:
    """Authors' form: the SE head reads the permuted tensor, and its output i is paired with w_i."""
    torch.manual_seed(0)
    strategy = EIWShuffleSplit(4, regularizer=form, se_reduction=1, generator_hidden=3, **options).double()
    perturb_parameters(strategy.attention, scale=1.0)
    logits = [0.3, -1.2, 2.0, 0.5]
    set_channel_logits(strategy, logits)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = strategy.permute(x)
    attention_logits = strategy.attention(y if not options else x)
    assert attention_logits.std(dim=0).min() > 0, "attention must vary over the batch for a real check"
    expected = hand_regularizer(
        logits, attention_logits.detach(), form, options.get("se_activation", "softmax")
    )
    assert strategy.regularization().item() == pytest.approx(expected, abs=1e-12)


def test_reference_regularizer_is_the_authors_kl_div_loss_call() -> None:
    """The authors compute torch.nn.KLDivLoss(reduction="batchmean")(softmax SE of the sorted x, w)."""
    torch.manual_seed(1)
    strategy = EIWShuffleSplit(8, se_reduction=2).double()
    perturb_parameters(strategy, scale=0.5)
    x = torch.randn(5, 8, 3, 3, dtype=torch.float64)
    y = strategy.permute(x)
    s = torch.softmax(strategy.attention(y), dim=1)
    w = torch.softmax(strategy.generator(), dim=0).view(1, -1).expand_as(s)
    expected = torch.nn.KLDivLoss(reduction="batchmean")(s, w)
    torch.testing.assert_close(strategy.regularization(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("form", ["reference", "kl"])
def test_regularizer_minimum_is_documented_target(form: str) -> None:
    """reference is minimised by w = softmax(mean s), kl by w = q (where it is 0)."""
    strategy = EIWShuffleSplit(4, regularizer=form, se_input="aligned").double()
    x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    mean_s = torch.softmax(strategy.attention(x).detach(), dim=1).mean(dim=0)
    target = mean_s if form == "reference" else torch.log(mean_s / mean_s.sum())
    set_channel_logits(strategy, target.tolist())
    strategy.permute(x)
    last = strategy.generator.fc[2].weight
    (grad,) = torch.autograd.grad(strategy.regularization(), last)
    assert grad.abs().max() < 1e-12
    if form == "kl":
        assert abs(strategy.regularization().item()) < 1e-12


@pytest.mark.parametrize("form", ["reference", "kl"])
@pytest.mark.parametrize("logits", [[0.0, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, -1e4], [-80.0, 80.0, 80.0, 3.0]])
def test_no_nan_for_peaked_or_uniform_weights_and_ties_break_by_index(form: str, logits: list[float]) -> None:
    strategy = EIWShuffleSplit(4, regularizer=form, generator="code").double()
    set_channel_logits(strategy, logits)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    strategy.permute(x)
    reg = strategy.regularization()
    reg.backward()
    assert torch.isfinite(reg)
    assert all(torch.isfinite(p.grad).all() for p in strategy.parameters() if p.grad is not None)
    expected = sorted(range(4), key=lambda j: (-logits[j], j))
    assert strategy.permutation().tolist() == expected


def strategy_grads(model: nn.Module, sigma: float) -> dict[str, Tensor | None]:
    model.zero_grad(set_to_none=True)
    x = images(4, seed=5)
    loss = model.bits_per_dim(x, generator=torch.Generator().manual_seed(0)).mean()
    (loss + sigma * model.regularization()).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_sigma_reaches_the_flow_features_in_the_authors_form() -> None:
    """The default eiw: sigma * R has a gradient on the coupling networks (sigma is a real knob)."""
    model = trained("eiw", steps=1)
    zero, one = strategy_grads(model, 0.0), strategy_grads(model, 1.0)
    coupling = [n for n in zero if n.startswith("levels.0.") and ".net." in n]
    assert coupling
    assert any((zero[n] - one[n]).abs().max() > 1e-8 for n in coupling), "R must reach the couplings"
    model.zero_grad(set_to_none=True)
    model.bits_per_dim(images(4, seed=5), generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(
        model.regularization(), [p for n, p in model.named_parameters() if n in coupling]
    )
    assert max(g.abs().max().item() for g in grads) > 0
    for name in (n for n in zero if ".generator." in n or ".attention." in n):
        assert zero[name] is None or zero[name].abs().max() == 0, f"sigma=0 must give {name} no gradient"
        assert one[name] is not None and one[name].abs().max() > 0, f"sigma=1 must train {name}"
    assert model.regularization().item() == pytest.approx(
        sum(s.strategy.regularization().item() for s in model.splits)
    )


def test_detached_se_input_keeps_the_regularizer_off_the_flow() -> None:
    """The first Shuffle's form (se_detach): the regulariser trains only the generator and SE head."""
    model = trained("eiw", steps=1, se_detach=True)
    zero, one = strategy_grads(model, 0.0), strategy_grads(model, 1.0)
    strategy_params = {n for n in zero if ".generator." in n or ".attention." in n}
    for name in set(zero) - strategy_params:
        torch.testing.assert_close(zero[name], one[name], atol=1e-12, rtol=0)


def test_sigma_changes_training() -> None:
    """Two short trainings whose sigma differs 100x end with different coupling weights."""
    weights = []
    for sigma in (1e-3, 1e-1):
        torch.manual_seed(0)
        model = tiny_model("eiw")
        initialize_actnorm(model, images(16))
        train(model, 5, sigma=sigma)
        weights.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".net." in n]))
    assert (weights[0] - weights[1]).abs().max() > 1e-4


def kept_set(strategy: EIWShuffleSplit) -> list[int]:
    return sorted(strategy.permutation()[: strategy.num_keep].tolist())


def test_hysteresis_keeps_the_kept_set_until_a_logit_wins_by_the_margin() -> None:
    strategy = eiw_strategy(stabilizer="hysteresis", hysteresis_margin=1.0)  # kept {1, 3}
    strategy.advance(1)
    assert kept_set(strategy) == [1, 3]
    set_channel_logits(strategy, [0.9, 2.0, -1.0, 0.5])  # channel 0 beats 3 by 0.4 < margin
    strategy.advance(2)
    assert kept_set(strategy) == [1, 3]
    set_channel_logits(strategy, [1.6, 2.0, -1.0, 0.5])  # by 1.1 > margin
    strategy.advance(3)
    assert kept_set(strategy) == [0, 1]
    diagnostics = strategy.diagnostics()
    assert diagnostics["kept_changes"] == 1.0
    assert diagnostics["churn"] == pytest.approx(1 / 3, rel=0.02)  # 1 of 3 steps (debiased EMA)


def test_ema_stabiliser_follows_the_logits_slowly_and_live_form_churns() -> None:
    ema = eiw_strategy(stabilizer="ema", ema_momentum=0.9)
    live = eiw_strategy()
    for strategy in (ema, live):
        strategy.advance(1)
        set_channel_logits(strategy, [2.5, 2.0, -1.0, 0.7])  # channel 0 now ranks first
        strategy.advance(2)
    assert kept_set(live) == [0, 1] and kept_set(ema) == [1, 3], "one step moves the EMA a little"
    for step in range(3, 40):
        ema.advance(step)
    assert kept_set(ema) == [0, 1]
    assert live.diagnostics()["kept_changes"] == 1.0 and ema.diagnostics()["kept_changes"] == 1.0
    assert live.diagnostics()["churn"] == pytest.approx(0.5, rel=0.02)  # 1 of 2 steps


def test_diagnostics_kendall_tau_entropy_and_overlap() -> None:
    strategy = EIWShuffleSplit(4, se_reduction=2, generator_hidden=3).double()
    set_channel_logits(strategy, [3.0, 2.0, 1.0, 0.0])
    strategy.initial_perm.copy_(torch.tensor([0, 1, 2, 3]))
    diag = strategy.diagnostics()
    assert diag["kendall_tau"] == 1.0 and diag["static_overlap"] == 1.0
    set_channel_logits(strategy, [0.0, 1.0, 2.0, 3.0])
    diag = strategy.diagnostics()
    assert diag["kendall_tau"] == -1.0 and diag["static_overlap"] == 0.0
    set_channel_logits(strategy, [0.0, 0.0, 0.0, 0.0])
    assert strategy.diagnostics()["w_entropy"] == pytest.approx(math.log(4))
    lcma = frozen_lcma(c=4)
    assert lcma.diagnostics()["static_overlap"] == pytest.approx((lcma.order[:2] < 2).double().mean().item())
    model = trained("eiw", steps=3)
    diagnostics = model.split_diagnostics()
    assert set(diagnostics) == {
        f"split0/{k}" for k in ("churn", "kept_changes", "kendall_tau", "w_entropy", "static_overlap")
    }
    assert tiny_model("static").split_diagnostics() == {"split0/static_overlap": 1.0}


def test_checkpoint_of_the_first_shuffle_form_fails_clearly_or_loads_with_its_options() -> None:
    legacy = dict(generator="code", se_activation="sigmoid", se_input="aligned", se_detach=True,
                  se_bias=True, se_reduction=4, generator_hidden=32)  # fmt: skip
    old = tiny_model("eiw", **legacy).state_dict()
    new_buffers = ("initial_perm", "logit_ema", "last_step", "last_kept", "churn_ema", "num_transitions",
                   "num_kept_changes")  # fmt: skip
    old = {k.replace("held_perm", "frozen_perm"): v for k, v in old.items() if not k.endswith(new_buffers)}
    with pytest.raises(ValueError, match="generator: code"):
        tiny_model("eiw").load_state_dict(old)
    tiny_model("eiw", **legacy).load_state_dict(old)

