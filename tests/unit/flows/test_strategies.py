"""Split strategies (static, EIW Shuffle, LCMA): permutations, exactness, regulariser, freezing, LCMA."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from flows import FlowConfig, Split, SplitConfig, build_flow, initialize_actnorm
from flows.strategies import LCMASplit, StaticSplit
from tests.unit.bijection_harness import check_bijection, jacobian_log_det, perturb_parameters
from tests.unit.flows.strategy_models import (
    eiw_strategy,
    frozen_lcma,
    images,
    set_channel_logits,
    tiny_model,
    train,
    trained,
)

STRATEGIES = ["static", "static_swapped", "eiw", "lcma"]














class PermutationOnly(nn.Module):
    """A strategy as a bare bijection with log_det 0; its own parameters are hidden from the harness
    (they learn only through the regulariser, tested separately)."""

    def __init__(self, strategy: nn.Module) -> None:
        super().__init__()
        self._strategy = [strategy]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._strategy[0].permute(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self._strategy[0].unpermute(y)


class LikelihoodPath(PermutationOnly):
    """A Split with a strategy; only the split's prior net is a registered (harness-checked) parameter."""

    def __init__(self, split: Split) -> None:
        super().__init__(split)
        self.prior_net = split.prior_net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._strategy[0](x)

    def inverse(self, y: Tensor) -> Tensor:
        return self._strategy[0].inverse(y)


EIW_OPTIONS = {
    "authors": {},
    "aligned_sigmoid_detached": dict(
        se_input="aligned", se_activation="sigmoid", se_detach=True, se_bias=True
    ),
    "code_generator": dict(generator="code"),
    "ema": dict(stabilizer="ema", ema_momentum=0.5),
    "hysteresis": dict(stabilizer="hysteresis", hysteresis_margin=0.5),
    "kl": dict(regularizer="kl"),
    # The opt-in forms of issue 24 (docs/model.md, "Shuffle forms").
    "normalized_input": dict(generator_input="normalized"),
    "log_input": dict(generator_input="log"),
    "free_logits": dict(generator_input="none"),
    "temperature": dict(target_temperature=0.05),
    "kl_temperature": dict(regularizer="kl", target_temperature=0.05),
    "entropy_target": dict(target="entropy"),
    "entropy_kl_hysteresis": dict(target="entropy", regularizer="kl", stabilizer="hysteresis"),
}




HARNESS = {
    "static": lambda: PermutationOnly(StaticSplit()),
    "static_swapped": lambda: PermutationOnly(StaticSplit(swap_halves=True)),
    "eiw_frozen": lambda: PermutationOnly(eiw_strategy(frozen=True)),
    "lcma_frozen": lambda: PermutationOnly(frozen_lcma()),
    "split_lcma": lambda: LikelihoodPath(Split(4, strategy=frozen_lcma()).double()),
    "split_static_swapped": lambda: LikelihoodPath(Split(4, strategy=StaticSplit(swap_halves=True)).double()),
}
for _name, _options in EIW_OPTIONS.items():
    HARNESS[f"eiw_{_name}"] = lambda o=_options: PermutationOnly(eiw_strategy(**o))
    HARNESS[f"split_eiw_{_name}"] = lambda o=_options: LikelihoodPath(
        Split(4, strategy=eiw_strategy(**o)).double()
    )


@pytest.mark.parametrize("name", sorted(HARNESS))
def test_strategy_bijections_pass_the_harness(name: str) -> None:
    """Round trip, log_det against the autograd Jacobian (0 for bare permutations), gradients."""
    bijection = HARNESS[name]().double()
    perturb_parameters(bijection)
    check_bijection(bijection, torch.randn(2, 4, 2, 2, dtype=torch.float64))


def test_permutations_are_true_permutations_and_not_identity() -> None:
    eiw = eiw_strategy()
    assert eiw.permutation().tolist() == [1, 3, 0, 2]
    lcma = frozen_lcma(c=6, h=3, w=2)
    assert torch.equal(lcma.order.sort(dim=0).values, torch.arange(6).view(6, 1, 1).expand(6, 3, 2))
    assert not torch.equal(lcma.order[:, 0, 0], lcma.order[:, 1, 1]), "orders are per position"
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    for strategy in (eiw, frozen_lcma(), StaticSplit(swap_halves=True)):
        y = strategy.permute(x)
        assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values) and not torch.equal(y, x)
    swapped = StaticSplit(swap_halves=True).permute(x)
    assert torch.equal(swapped[:, :2], x[:, 2:]) and torch.equal(swapped[:, 2:], x[:, :2])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_inverts_encode_and_log_det_matches_jacobian(strategy: str) -> None:
    model = trained(strategy, steps=3)  # lcma_warmup_steps=2: LCMA is frozen and non-trivial here
    if strategy == "lcma":
        assert all(bool(s.strategy.frozen) for s in model.splits)
        assert not torch.equal(model.splits[0].strategy.order, LCMASplit(12, 4, 4).order)
    x = model.dequantize(images(3, seed=9))
    zs, log_det = model.encode(x)
    torch.testing.assert_close(model.decode(zs), x, atol=1e-10, rtol=0)

    class Encoder(nn.Module):
        def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
            zs, ld = model.encode(v)
            return torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1), ld

    small = x[:1]
    torch.testing.assert_close(jacobian_log_det(Encoder(), small), model.encode(small)[1], atol=1e-7, rtol=0)



def test_strategies_share_every_other_weight_at_one_init_seed() -> None:
    """Paired seeds: static, static_swapped, eiw and lcma differ only in their strategy modules."""
    states = {}
    for strategy in STRATEGIES:
        torch.manual_seed(123)  # the global RNG must not matter
        model = tiny_model(strategy)
        states[strategy] = {k: v for k, v in model.state_dict().items() if ".strategy." not in k}
        torch.manual_seed(456)
    reference = states["static"]
    for strategy, state in states.items():
        assert state.keys() == reference.keys(), strategy
        for key, value in state.items():
            assert torch.equal(value, reference[key]), f"{strategy}: {key} differs from static"
    other = build_flow(
        FlowConfig(image_shape=(3, 8, 8), num_levels=2, num_steps=2, hidden_channels=8, init_seed=1)
    )
    assert not torch.equal(
        other.state_dict()["levels.0.layers.1.layers.2.net.conv_in.weight"],
        reference["levels.0.layers.1.layers.2.net.conv_in.weight"],
    )


def test_eiw_permutation_follows_parameters_until_frozen() -> None:
    model = trained("eiw", steps=2, freeze_after_steps=3)
    strategy = model.splits[0].strategy
    order = list(range(12))
    set_channel_logits(strategy, [float(-j) for j in order])
    assert strategy.permutation().tolist() == order, "unfrozen: the current parameters decide"
    model.advance(2)
    assert not bool(strategy.frozen)
    model.advance(3)
    set_channel_logits(strategy, [float(j) for j in order])
    assert bool(strategy.frozen) and strategy.permutation().tolist() == order
    x = model.dequantize(images(2))
    torch.testing.assert_close(model.decode(model.encode(x)[0]), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("strategy", ["eiw", "lcma"])
def test_frozen_permutations_survive_state_dict_save_and_load(strategy: str) -> None:
    knobs = {"freeze_after_steps": 2} if strategy == "eiw" else {}  # LCMA freezes after warmup_steps=2
    model = trained(strategy, steps=4, **knobs)
    assert all(bool(s.strategy.frozen) for s in model.splits)
    if strategy == "eiw":  # move w so the live sort differs from the frozen permutation
        set_channel_logits(model.splits[0].strategy, [float(j) for j in range(12)])
    before = [s.strategy.permutation() if strategy == "eiw" else s.strategy.order for s in model.splits]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = tiny_model(strategy, **knobs)
    reloaded.load_state_dict(torch.load(buffer))
    after = [s.strategy.permutation() if strategy == "eiw" else s.strategy.order for s in reloaded.splits]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    x = images(4, seed=3)
    a = model.bits_per_dim(x, generator=torch.Generator().manual_seed(1))
    b = reloaded.bits_per_dim(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(model.sample(2, generator=torch.Generator().manual_seed(0)),
                       reloaded.sample(2, generator=torch.Generator().manual_seed(0)))  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampling_works_with_each_strategy(strategy: str) -> None:
    model = trained(strategy, steps=3)
    samples = model.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 8, 8) and samples.dtype == torch.uint8
    assert torch.equal(samples, model.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(model.bits_per_dim(samples)).all()


def test_lcma_contribution_is_the_documented_sum() -> None:
    """One training forward: contribution = mean log N(x) + per-dim log-dets, which sum to the level's."""
    model = tiny_model("lcma", warmup_steps=5)
    initialize_actnorm(model, images(16))
    perturb_parameters(model, scale=0.1)
    model.advance(0)
    captured = {}
    model.splits[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0].detach()))
    level = model.levels[0]
    level.register_forward_hook(lambda m, args, out: captured.update(log_det=out[1].detach()))
    model.bits_per_dim(images(6, seed=1))
    strategy = model.splits[0].strategy
    x = captured["x"]
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(x).mean(dim=0)
    per_dim_log_det = strategy.contribution() - log_prior
    torch.testing.assert_close(per_dim_log_det.sum(), captured["log_det"].mean(), atol=1e-9, rtol=0)
    # ActNorm and 1x1-conv terms are constant over positions; coupling terms only on its b-half.
    first_half = per_dim_log_det[:6]
    torch.testing.assert_close(first_half, first_half[:, :1, :1].expand_as(first_half))
    assert per_dim_log_det[6:].std(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("factor_out", ["low", "high"])
def test_lcma_order_follows_contributions(factor_out: str) -> None:
    strategy = frozen_lcma(c=8, h=3, w=3, factor_out=factor_out, seed=4)
    ranked = strategy.contribution().gather(0, strategy.order)
    steps = ranked[1:] - ranked[:-1]
    assert (steps <= 0).all() if factor_out == "low" else (steps >= 0).all()
    kept = strategy.order[:4].sort(dim=0).values
    best = strategy.contribution().topk(4, dim=0, largest=factor_out == "low").indices.sort(dim=0).values
    assert torch.equal(kept, best), "the continuing half is the end that is not factored out"
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    y = strategy.permute(x)
    for c, h, w in [(0, 0, 0), (5, 2, 1), (7, 1, 2)]:
        assert torch.equal(y[:, c, h, w], x[:, strategy.order[c, h, w], h, w])


def test_lcma_measures_while_warming_up_and_stops_changing_once_frozen() -> None:
    model = trained("lcma", steps=2, warmup_steps=2)
    strategy = model.splits[0].strategy
    assert strategy.num_updates.item() == 2 and not bool(strategy.frozen)
    x = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(strategy.permute(x), x), "static split during warm-up"
    with torch.no_grad():
        model.bits_per_dim(images(4))
    model.eval()
    model.bits_per_dim(images(4))
    model.train()
    assert strategy.num_updates.item() == 2, "only training forwards with gradients measure"
    model.advance(2)
    state = {k: v.clone() for k, v in strategy.state_dict().items()}
    train(model, 3, first_step=2)
    assert bool(strategy.frozen)
    for key, value in strategy.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed after freezing"


def test_advance_binds_idempotently_and_rejects_bad_steps() -> None:
    model = tiny_model("lcma")
    model.advance(0)
    assert all(s.strategy.is_bound for s in model.splits)
    model.advance(1)  # binding is idempotent
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            model.advance(bad)



@pytest.mark.parametrize(
    ("split", "match"),
    [
        ({"strategy": "magic"}, "strategy"),
        ({"regularizer": "l2"}, "regularizer"),
        ({"generator": "lstm"}, "generator"),
        ({"se_activation": "tanh"}, "se_activation"),
        ({"se_input": "shuffled"}, "se_input"),
        ({"stabilizer": "glue"}, "stabilizer"),
        ({"strategy": "eiw", "ema_momentum": 1.0}, "ema_momentum"),
        ({"strategy": "eiw", "hysteresis_margin": math.inf}, "hysteresis_margin"),
        ({"strategy": "eiw", "freeze_after_steps": -3}, "freeze_after_steps"),
        ({"strategy": "eiw", "se_reduction": 0}, "se_reduction"),
        ({"strategy": "eiw", "generator_hidden": 0}, "generator_hidden"),
        ({"strategy": "eiw", "generator_input": "width"}, "generator_input"),
        ({"strategy": "eiw", "generator": "code", "generator_input": "log"}, "generator_input"),
        ({"strategy": "eiw", "target": "variance"}, "target"),
        ({"strategy": "eiw", "target_temperature": 0.0}, "target_temperature"),
        ({"strategy": "lcma", "warmup_steps": 0}, "warmup_steps"),
        ({"strategy": "lcma", "lcma_warmup_steps": 0}, "warmup_steps"),  # the old key, mapped
        ({"strategy": "lcma", "factor_out": "middle"}, "factor_out"),
        ({"strategy": "lcma", "momentum": 1.0}, "momentum"),
        ({"strategy": "static", "se_reduction": 4}, "se_reduction"),  # a knob of another strategy
        ({"strategy": "eiw", "lcma_warmup_steps": 5}, "lcma_warmup_steps"),
    ],
)
def test_split_config_validation_names_the_field(split: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"^{match}:"):
        SplitConfig(**split)


def test_kept_shares_picture_the_order() -> None:
    for strategy in STRATEGIES:
        model = trained(strategy, steps=3)
        (share,) = model.kept_shares()
        assert share.shape == (12,) and share.sum().item() == pytest.approx(6.0)
        if strategy == "static":
            assert share.tolist() == [1.0] * 6 + [0.0] * 6
        if strategy == "static_swapped":
            assert share.tolist() == [0.0] * 6 + [1.0] * 6
        if strategy == "eiw":
            kept = model.splits[0].strategy.permutation()[:6]
            assert share[kept].tolist() == [1.0] * 6
        if strategy == "lcma":  # per position: fractions, each position keeps 6 of 12 channels
            order = model.splits[0].strategy.order
            assert share[3].item() == pytest.approx((order[:6] == 3).double().sum().item() / 16)
