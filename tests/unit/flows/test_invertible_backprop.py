"""model.memory = invertible / checkpoint: the same gradients as standard backprop, hooks run once, LCMA
measures the same, stored activations do not grow with depth, autocast and non-finite steps work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm
from flows.coupling import AffineCoupling
from flows.invertible import FlowLevel, reconstruction_error
from tests.unit.bijection_harness import perturb_parameters

MODES = ["invertible", "checkpoint"]
SIGMA = 0.5  # large, so that the regulariser's gradient is not lost next to the likelihood's
VARIANTS = {
    "static": dict(strategy="static"),
    "eiw": dict(strategy="eiw"),
    "eiw-frozen": dict(strategy="eiw", freeze_after_steps=0),
    "lcma-measuring": dict(strategy="lcma", lcma_warmup_steps=10),
    "lcma-frozen": dict(strategy="lcma", lcma_warmup_steps=1),
}


def images(n: int, seed: int = 0, shape: tuple[int, int, int] = (3, 8, 8)) -> Tensor:
    return torch.randint(
        0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def config(split: dict, **overrides) -> FlowConfig:
    base = dict(image_shape=(3, 8, 8), num_levels=2, num_steps=3, hidden_channels=8)
    base.update(overrides)
    return FlowConfig(split=SplitConfig(**split), **base)


def reference_model(cfg: FlowConfig) -> nn.Module:
    """float64, ActNorm initialised, every parameter perturbed (zero-initialised convs would make every
    coupling the identity and the EIW/LCMA parts trivial)."""
    torch.manual_seed(0)
    model = build_flow(cfg).double()
    initialize_actnorm(model, images(16))
    with torch.no_grad():
        perturb_parameters(model, scale=0.1)
    return model


def copy_of(model: nn.Module, mode: str) -> nn.Module:
    other = build_flow(model.cfg).double()
    other.load_state_dict(model.state_dict())
    other.memory = mode
    return other


def loss_of(model: nn.Module, step: int = 0) -> Tensor:
    """What the trainer minimises: mean bits/dim + sigma * regulariser (fixed dequantization noise)."""
    model.advance(step)
    noise = torch.Generator().manual_seed(100 + step)
    return (
        model.bits_per_dim(images(4, seed=1 + step), generator=noise).mean() + SIGMA * model.regularization()
    )


def gradients(model: nn.Module, step: int = 0) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, step).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_equal_standard_backprop_in_float64(variant: str, mode: str) -> None:
    base = reference_model(config(VARIANTS[variant]))
    standard = copy_of(base, "standard")
    other = copy_of(base, mode)
    for step in range(2):  # step 1: after advance(1) froze what freezes, and LCMA has measured once
        expected, got = gradients(standard, step), gradients(other, step)
        for name, g in expected.items():
            assert g is not None and got[name] is not None, f"{name}: no gradient"
            assert got[name].abs().max() > 0 or g.abs().max() == 0, name
            torch.testing.assert_close(got[name], g, atol=1e-10, rtol=0, msg=f"{variant} {mode} {name}")
    # Every parameter, including the EIW generator and SE head and the split priors, got a gradient.
    names = set(expected)
    assert any(".prior_net." in n for n in names)
    if variant.startswith("eiw"):
        assert any(".generator." in n for n in names) and any(".attention." in n for n in names)
        assert all(expected[n].abs().max() > 0 for n in names if ".attention." in n or ".generator." in n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overrides", [dict(coupling="additive"), dict(split_prior="standard", num_levels=3)])
def test_gradients_equal_for_additive_coupling_and_standard_prior(mode: str, overrides: dict) -> None:
    base = reference_model(config({"strategy": "eiw"}, **overrides))
    expected, got = gradients(copy_of(base, "standard")), gradients(copy_of(base, mode))
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_lcma_measures_once_per_forward_and_the_same_as_standard(mode: str) -> None:
    base = reference_model(config(VARIANTS["lcma-measuring"]))
    models = {"standard": copy_of(base, "standard"), mode: copy_of(base, mode)}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3) for name, model in models.items()}
    for step in range(3):
        for name, model in models.items():
            optimizers[name].zero_grad()
            loss_of(model, step).backward()
            optimizers[name].step()
        for a, b in zip(models["standard"].splits, models[mode].splits, strict=True):
            assert int(a.strategy.num_updates) == int(b.strategy.num_updates) == step + 1
            if step == 0:  # the same parameters: bit for bit the same measurement
                assert torch.equal(a.strategy.running_contribution, b.strategy.running_contribution)
            else:  # parameters now differ by the gradients' rounding (1e-14)
                torch.testing.assert_close(
                    a.strategy.running_contribution, b.strategy.running_contribution, atol=1e-10, rtol=0
                )
    # The measuring hooks are still attached after backward suppressed them.
    couplings = [m for m in models[mode].levels[0].modules() if isinstance(m, AffineCoupling)]
    assert all(len(c.net._forward_hooks) == 1 for c in couplings)


@pytest.mark.parametrize("mode", MODES)
def test_forward_hooks_run_once_per_training_step(mode: str) -> None:
    model = copy_of(reference_model(config({"strategy": "static"})), mode)
    calls: list[bool] = []
    handles = [
        m.net.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        for m in model.modules()
        if isinstance(m, AffineCoupling)
    ]
    loss_of(model).backward()
    assert len(calls) == len(handles) == 2 * 3 and all(calls)  # once each, as a gradient-enabled forward


def activation_bytes(model: nn.Module) -> int:
    """Bytes of the unique non-parameter storages autograd saves for one training loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("strategy", ["static", "eiw", "lcma"])
def test_stored_activations_do_not_grow_with_depth(strategy: str) -> None:
    saved = {
        (mode, k): activation_bytes(
            copy_of(reference_model(config({"strategy": strategy}, num_steps=k)), mode)
        )
        for mode in ("standard", "invertible")
        for k in (2, 6)
    }
    assert saved[("invertible", 6)] == saved[("invertible", 2)]
    assert saved[("standard", 6)] > 2 * saved[("standard", 2)]
    assert saved[("invertible", 6)] < 0.25 * saved[("standard", 6)]


def test_modes_share_state_dict_values_and_evaluation() -> None:
    base = reference_model(config({"strategy": "eiw"}))
    standard, invertible = copy_of(base, "standard"), copy_of(base, "invertible")
    assert list(standard.state_dict()) == list(invertible.state_dict())
    assert all(isinstance(level, FlowLevel) and level.memory == "invertible" for level in invertible.levels)
    assert invertible.cfg.memory == "invertible"
    x = standard.dequantize(images(4, seed=3), generator=torch.Generator().manual_seed(0))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            (za, lda), (zb, ldb) = standard.encode(x), invertible.encode(x)
        assert torch.equal(lda, ldb) and all(torch.equal(a, b) for a, b in zip(za, zb, strict=True))
    torch.testing.assert_close(invertible.decode(zb), x, atol=1e-10, rtol=0)


def test_actnorm_init_is_the_same_in_every_mode() -> None:
    inits = []
    for mode in ("standard", "invertible", "checkpoint"):
        model = build_flow(config({"strategy": "eiw"}, memory=mode))
        torch.manual_seed(0)  # initialize_actnorm dequantizes with the global RNG
        assert initialize_actnorm(model, images(16)) == 2 * 3
        inits.append(
            torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "layers.0" in n])
        )
    assert torch.equal(inits[0], inits[1]) and torch.equal(inits[0], inits[2])


def test_memory_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="memory"):
        FlowConfig(memory="reversible")
    model = build_flow(config({"strategy": "static"}))
    with pytest.raises(ValueError, match="memory"):
        model.memory = "none"
    assert model.memory == "standard"


def test_bf16_autocast_gradients_are_as_close_to_float32_as_standard_mode() -> None:
    """Under CPU bf16 autocast invertible mode runs ActNorm and the 1x1 conv in float32 (they are inverted
    numerically), so its gradients are at least as close to the float32 ones as standard autocast's."""
    cfg = config({"strategy": "eiw"}, image_shape=(3, 16, 16), num_steps=4, hidden_channels=16)
    torch.manual_seed(0)
    base = build_flow(cfg)
    initialize_actnorm(base, images(16, shape=(3, 16, 16)))
    with torch.no_grad():
        perturb_parameters(base, scale=0.05)

    def flat_grad(mode: str, amp: bool) -> Tensor:
        model = build_flow(cfg)
        model.load_state_dict(base.state_dict())
        model.memory = mode
        model.advance(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            bpd = model.bits_per_dim(images(4, 1, (3, 16, 16)), generator=torch.Generator().manual_seed(0))
            reg = model.regularization()
        (bpd.float().mean() + 1e-3 * reg.float()).backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = flat_grad("standard", amp=False)
    error = {mode: ((flat_grad(mode, amp=True) - reference).norm() / reference.norm()).item() for mode in
             ("standard", "invertible", "checkpoint")}  # fmt: skip
    assert error["invertible"] < max(error["standard"], 0.01)
    assert error["checkpoint"] == pytest.approx(error["standard"], rel=1e-6)

    x = base.dequantize(images(4, 1, (3, 16, 16)), generator=torch.Generator().manual_seed(0))
    fp32 = reconstruction_error(base, x)
    assert len(fp32) == 2 and max(fp32) < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_steps_backpropagate_without_raising_and_the_next_step_is_exact(mode: str) -> None:
    base = reference_model(config({"strategy": "eiw"}))
    model, standard = copy_of(base, mode), copy_of(base, "standard")
    # A poisoned loss (what the trainer's fault injection does), then a forward that overflows.
    (loss_of(model) * float("nan")).backward()
    assert all(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    log_scale = model.levels[0].layers[1].layers[0].log_scale  # the first ActNorm
    kept = log_scale.detach().clone()
    with torch.no_grad():
        log_scale.add_(1e3)  # exp(1000) = inf
    model.zero_grad()
    loss = loss_of(model)
    assert not torch.isfinite(loss)
    loss.backward()  # the inverses meet inf and NaN; the trainer sees a non-finite norm and skips
    with torch.no_grad():
        log_scale.copy_(kept)
    expected, got = gradients(standard, 1), gradients(model, 1)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-10, rtol=0, msg=name)


def test_pipeline_train_step_skips_a_poisoned_step_in_invertible_mode() -> None:
    from pipeline.config import load_config
    from pipeline.runtime import Runtime
    from pipeline.step import TrainingObjective, make_optimizer, train_step

    tiny = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["model.memory=invertible", "model.image_shape=[3,8,8]"])
    flow = build_flow(cfg.model)
    initialize_actnorm(flow, images(8))
    objective = TrainingObjective(flow)
    optimizer = make_optimizer(objective.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in flow.parameters()]
    flow.advance(0)
    result = train_step(objective, images(8), optimizer, scheduler, cfg=cfg, runtime=Runtime(), poison=True)
    assert result.skipped and all(torch.equal(a, p) for a, p in zip(before, flow.parameters(), strict=True))
    result = train_step(objective, images(8), optimizer, scheduler, cfg=cfg, runtime=Runtime())
    assert not result.skipped and any(
        not torch.equal(a, p) for a, p in zip(before, flow.parameters(), strict=True)
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_under_saved_tensor_hooks_that_copy(mode: str) -> None:
    """Saved-tensor hooks (CPU offloading, the benchmarks' byte counting) hand back other tensor objects."""
    base = reference_model(config({"strategy": "eiw"}))
    expected = gradients(copy_of(base, "standard"))
    model = copy_of(base, mode)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = loss_of(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["standard", "invertible"])
def test_a_parameter_changed_in_place_before_backward_is_an_error(mode: str) -> None:
    model = copy_of(reference_model(config({"strategy": "static"})), mode)
    loss = loss_of(model)
    with torch.no_grad():
        model.levels[0].layers[1].layers[2].net.conv_in.weight.mul_(1.1)  # e.g. optimizer.step() too early
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


def test_rebuild_error_is_reported_after_backward_and_matches_the_diagnostic() -> None:
    base = reference_model(config({"strategy": "eiw"}))
    standard, model = copy_of(base, "standard"), copy_of(base, "invertible")
    assert model.memory_diagnostics() == {}
    loss_of(model).backward()
    loss_of(standard).backward()
    assert standard.memory_diagnostics() == {}
    live = model.memory_diagnostics()
    assert list(live) == ["level0/rebuild_error", "level1/rebuild_error"]
    assert all(0 <= v < 1e-12 for v in live.values())  # float64
    # The same path measured offline on a float32 copy: small but not zero, and the live value agrees.
    model32 = copy_of(base, "invertible").float()
    x = model32.dequantize(images(4, seed=1), generator=torch.Generator().manual_seed(100))
    offline = reconstruction_error(model32, x)
    model32.zero_grad()
    model32.advance(0)
    model32.bits_per_dim(images(4, seed=1), generator=torch.Generator().manual_seed(100)).mean().backward()
    live32 = model32.memory_diagnostics()
    assert 0 < max(offline) < 1e-3
    assert [live32[f"level{i}/rebuild_error"] for i in range(2)] == pytest.approx(offline, rel=1e-6, abs=1e-9)
