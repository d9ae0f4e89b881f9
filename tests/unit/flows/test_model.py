"""FlowModel: the public API of DESIGN.md, exactness, likelihood, init, save/load, sampling, learning."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from flows import ActNorm, FlowConfig, build_flow, initialize_actnorm
from tests.unit.bijection_harness import jacobian_log_det, perturb_parameters


def tiny_config(**overrides) -> FlowConfig:
    base = dict(image_shape=(3, 8, 8), num_levels=2, num_steps=2, hidden_channels=8)
    base.update(overrides)
    return FlowConfig(**base)


def random_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


class _Encoder(nn.Module):
    """The whole model as one map x -> concatenated latents, for the Jacobian check."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        zs, log_det = self.model.encode(x)
        return torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1), log_det


@pytest.mark.parametrize(
    "overrides",
    [
        dict(image_shape=(3, 8, 8), num_levels=1, num_steps=1),
        dict(image_shape=(3, 8, 8), num_levels=2, num_steps=3),
        dict(image_shape=(1, 16, 8), num_levels=3, num_steps=2),
        dict(image_shape=(3, 16, 16), num_levels=2, num_steps=2, coupling="additive"),
        dict(image_shape=(3, 8, 8), num_levels=2, num_steps=2, split_prior="standard", learn_top_prior=False),
    ],
)
def test_decode_inverts_encode_exactly(overrides) -> None:
    torch.manual_seed(0)
    model = build_flow(tiny_config(**overrides)).double()
    initialize_actnorm(model, random_images(8, model.cfg.image_shape))
    perturb_parameters(model, scale=0.05)
    x = model.dequantize(random_images(4, model.cfg.image_shape, seed=1))
    zs, log_det = model.encode(x)
    assert log_det.shape == (4,)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    assert sum(z[0].numel() for z in zs) == model.num_dims
    torch.testing.assert_close(model.decode(zs), x, atol=1e-10, rtol=0)


def test_model_log_det_matches_autograd_jacobian() -> None:
    torch.manual_seed(0)
    model = build_flow(
        tiny_config(image_shape=(1, 4, 4), num_levels=2, num_steps=1, hidden_channels=4)
    ).double()
    perturb_parameters(model, scale=0.2)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    _, log_det = model.encode(x)
    torch.testing.assert_close(jacobian_log_det(_Encoder(model), x), log_det, atol=1e-8, rtol=0)


def test_bits_per_dim_is_finite_and_matches_log_prob() -> None:
    model = build_flow(tiny_config()).double()
    images = random_images(4, model.cfg.image_shape)
    initialize_actnorm(model, images)
    bpd = model.bits_per_dim(images, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (4,) and torch.isfinite(bpd).all()
    x = model.dequantize(images, generator=torch.Generator().manual_seed(0))
    d = model.num_dims
    expected = (-model.log_prob(x) / d + 8 * math.log(2.0)) / math.log(2.0)
    torch.testing.assert_close(bpd, expected)


def test_uniform_model_at_init_scores_about_eight_bits() -> None:
    """With identity-like init on uniform noise images the density is near the N(0,1) baseline."""
    model = build_flow(tiny_config(num_steps=1))
    bpd = model.bits_per_dim(random_images(16, model.cfg.image_shape)).mean()
    # x in [-0.5, 0.5) under a standard normal: -log N ~ 0.5*log(2 pi) + E[x^2]/2 nats per dim.
    expected = (0.5 * math.log(2 * math.pi) + 1 / 24) / math.log(2) + 8
    assert abs(bpd.item() - expected) < 0.2


def test_actnorm_init_gives_zero_mean_unit_variance() -> None:
    model = build_flow(tiny_config()).double()
    images = random_images(32, model.cfg.image_shape)
    outputs: list[Tensor] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
        for m in model.modules()
        if isinstance(m, ActNorm)
    ]
    assert initialize_actnorm(model, images) == 2 * 2
    for h in hooks:
        h.remove()
    assert len(outputs) == 4
    for y in outputs:
        torch.testing.assert_close(
            y.mean(dim=(0, 2, 3)), torch.zeros(y.shape[1], dtype=y.dtype), atol=1e-9, rtol=0
        )
        torch.testing.assert_close(
            y.std(dim=(0, 2, 3), unbiased=False), torch.ones(y.shape[1], dtype=y.dtype), atol=1e-5, rtol=0
        )
    assert initialize_actnorm(model, images) == 0, "a second call must not re-initialise"


def test_state_dict_round_trip_gives_identical_bits_per_dim() -> None:
    cfg = tiny_config()
    model = build_flow(cfg)
    images = random_images(8, cfg.image_shape)
    initialize_actnorm(model, images)
    perturb_parameters(model, scale=0.02)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = build_flow(cfg)
    reloaded.load_state_dict(torch.load(buffer))
    assert initialize_actnorm(reloaded, images) == 0, "a reloaded model must not re-initialise ActNorm"
    a = model.bits_per_dim(images, generator=torch.Generator().manual_seed(3))
    b = reloaded.bits_per_dim(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n_bits", [8, 5])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sample_shape_dtype_and_range(n_bits: int, temperature: float) -> None:
    model = build_flow(tiny_config(n_bits=n_bits))
    initialize_actnorm(model, random_images(8, model.cfg.image_shape))
    samples = model.sample(5, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 3, 8, 8) and samples.dtype == torch.uint8
    assert (samples.int() % 2 ** (8 - n_bits) == 0).all(), "samples must lie on the n_bits grid"
    again = model.sample(5, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)


def test_sample_round_trips_through_bits_per_dim() -> None:
    model = build_flow(tiny_config())
    initialize_actnorm(model, random_images(8, model.cfg.image_shape))
    samples = model.sample(4, temperature=0.8)
    assert torch.isfinite(model.bits_per_dim(samples)).all()


def test_regularization_is_zero_for_static_splits() -> None:
    model = build_flow(tiny_config())
    model.bits_per_dim(random_images(2, model.cfg.image_shape))
    reg = model.regularization()
    assert reg.shape == () and reg.item() == 0.0


def structured_images(n: int, generator: torch.Generator) -> Tensor:
    """Smooth colour gradients plus +-8 levels of pixel noise: about 4 bits/dim of true entropy, far
    below the 8 of noise images, so a flow that learns anything drops clearly."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=generator) * math.pi
    color = 40 + 150 * torch.rand(n, 3, 1, 1, generator=generator)
    ramp = (torch.cos(angle) * xx + torch.sin(angle) * yy) * 6
    noise = torch.randint(-8, 8, (n, 3, 8, 8), generator=generator)
    return (color + ramp + noise).clamp(0, 255).to(torch.uint8)


def test_short_training_run_lowers_bits_per_dim_clearly() -> None:
    torch.manual_seed(0)
    model = build_flow(tiny_config(num_steps=2, hidden_channels=16))
    data = torch.Generator().manual_seed(0)
    test = structured_images(128, torch.Generator().manual_seed(1))
    initialize_actnorm(model, structured_images(64, data))
    with torch.no_grad():
        before = model.bits_per_dim(test).mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = model.bits_per_dim(structured_images(32, data)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model.bits_per_dim(test).mean().item()
    assert math.isfinite(after)
    assert after < before - 2.0 and after < 5.5, f"bits/dim went from {before:.2f} to {after:.2f}"


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(2, 3, 8, 8), "dtype torch.uint8"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), "dtype torch.uint8"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "expected shape"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "expected shape"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "empty batch"),
    ],
)
def test_bits_per_dim_rejects_bad_input(images: Tensor, match: str) -> None:
    model = build_flow(tiny_config())
    with pytest.raises(ValueError, match=match):
        model.bits_per_dim(images)


def test_sample_rejects_bad_arguments() -> None:
    model = build_flow(tiny_config())
    with pytest.raises(ValueError, match="num"):
        model.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite"):
            model.sample(2, temperature=bad)


@pytest.mark.parametrize("shape", [(3, 32.7, 32), (3, 32.0, 32), (3, True, 32), (3, 32), (0, 32, 32)])
def test_image_shape_must_be_positive_integers(shape) -> None:
    with pytest.raises(ValueError, match="image_shape"):
        FlowConfig(image_shape=shape)


def test_glow_with_variational_dequantization_trains_q_and_scores_a_bound() -> None:
    """dequantization: variational works on the Glow base too: log q(u|x) enters bits/dim (so the
    dequantizer gets gradients), u stays in its bin, and the IWBO over the same draws is tighter."""
    from flows.config import DequantizerConfig

    cfg = tiny_config(
        dequantization="variational",
        dequantizer=DequantizerConfig(
            num_steps=1, context_channels=4, mid_channels=4, depth=1, growth=4, context_depth=1,
            context_growth=4,
        ),
    )
    model = build_flow(cfg).double()
    assert model.dequantizer is not None
    x_uint8 = random_images(4, cfg.image_shape)
    initialize_actnorm(model, x_uint8)
    x, log_q = model.dequantize_with_log_q(x_uint8)
    k = x_uint8.double() / 2 ** (8 - cfg.n_bits)
    assert ((x + 0.5) * 2**cfg.n_bits - k).min() > 0 and ((x + 0.5) * 2**cfg.n_bits - k).max() < 1
    model.bits_per_dim(x_uint8).mean().backward()
    grads = {n: p.grad for n, p in model.dequantizer.named_parameters()}
    assert all(g is not None for g in grads.values())
    # At init the couplings' zero output convs block the gradient to the layers before them (and to
    # the context net); the learned base, the 1x1 convs and the output convs get it.
    reached = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert {"base_loc", "base_log_scale", "flow.layers.0.log_s", "flow.layers.1.net.net.2.weight"} <= reached
    model.eval()
    torch.manual_seed(0)
    log_w = torch.stack([model.log_weights(x_uint8) for _ in range(4)]).detach()
    torch.manual_seed(0)
    iwbo = model.iwbo_bits_per_dim(x_uint8, 4)
    assert (iwbo < -log_w.mean(0) / (model.num_dims * math.log(2.0))).all()
