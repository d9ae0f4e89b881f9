"""The DenseFlow base: every bijective layer in float64, the cross-unit noise's log-density, the
assembled model (round trip, latents, strategies, memory modes) and the bounds it reports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flows import FlowConfig, build_flow, initialize_actnorm
from flows.config import DenseFlowConfig, SplitConfig
from flows.denseflow.attention import NystromAttention, iterative_inverse
from flows.denseflow.block import InvertibleDenseBlock
from flows.denseflow.coupling import ChannelSwitch, DenseAffineCoupling, dense_flow_layer
from tests.unit.bijection_harness import check_bijection, perturb_parameters

NET = dict(depth=1, growth=3, num_landmarks=2)


def tiny_dense(**overrides) -> FlowConfig:
    base = dict(
        base="denseflow",
        image_shape=(3, 8, 8),
        num_levels=2,
        split_prior="standard",
        denseflow=DenseFlowConfig(
            units=(3, 2), layers=(1, 2), mid_channels=(6, 6), growth_rate=2, net_depth=1, net_growth=3
        ),
    )
    base.update(overrides)
    return FlowConfig(**base)


def images(n: int, shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def _evaluated(module: nn.Module) -> nn.Module:
    # The coupling nets hold a BatchNorm: a bijection per mode, checked in eval (running statistics),
    # where one image's output does not depend on the others in its batch.
    torch.manual_seed(0)
    module = module.double()
    perturb_parameters(module, scale=0.2)
    return module.eval()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: DenseAffineCoupling(4, mid_channels=4, **NET), (2, 4, 2, 2)),
        (lambda: DenseAffineCoupling(5, mid_channels=4, **NET), (2, 5, 2, 2)),
        (lambda: ChannelSwitch(), (2, 4, 1, 2)),
        (lambda: ChannelSwitch(), (2, 5, 1, 2)),
        (
            lambda: dense_flow_layer(5, mid_channels=4, generator=torch.Generator().manual_seed(0), **NET),
            (2, 5, 2, 2),
        ),
    ],
    ids=["coupling_even", "coupling_odd", "switch_even", "switch_odd", "unit_layer"],
)
def test_dense_bijections_pass_the_float64_harness(make, shape) -> None:
    module = _evaluated(make())
    x = torch.randn(shape, dtype=torch.float64)
    check_bijection(module, x)


def test_coupling_log_scale_is_bounded_by_two() -> None:
    coupling = DenseAffineCoupling(4, mid_channels=4, **NET).double().eval()
    with torch.no_grad():
        coupling.net.net[-1].bias.fill_(1e3)  # a huge raw scale: 2 tanh(raw / 2) stays below 2
    _, log_det = coupling(torch.randn(1, 4, 2, 2, dtype=torch.float64))
    assert 0 < float(log_det.detach()) <= 2 * 2 * 4 + 1e-9  # 2 channels x 4 positions x at most 2


class _BlockWithNoise(nn.Module):
    """The block as the bijection (x, eps_1 .. eps_{n-1}) -> y, the noise stacked on x's channels:
    eta_i = mu_i + exp(log_scale_i) eps_i, so log|det| = units' log-dets + sum log_scale_i."""

    def __init__(self, block: InvertibleDenseBlock) -> None:
        super().__init__()
        self.block = block
        self.c = block.in_channels
        self.g = block.growth_rate

    def _noise(self, v: Tensor) -> list[Tensor]:
        return list(v[:, self.c :].split(self.g, dim=1))

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        eps = self._noise(v)
        log_scales = []

        def make_noise(i: int, mu: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
            log_scales.append(log_scale)
            return mu + torch.exp(log_scale) * eps[i - 1], eps[i - 1]

        y, log_det, _ = self.block.run(v[:, : self.c], make_noise)
        return y, log_det + sum(ls.flatten(1).sum(1) for ls in log_scales)

    def inverse(self, y: Tensor) -> Tensor:
        x, etas = self.block.inverse_with_noise(y)
        mus: list[Tensor] = []

        def replay(i: int, mu: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
            mus.append((mu, log_scale))
            return etas[i - 1], (etas[i - 1] - mu) * torch.exp(-log_scale)

        self.block.run(x, replay)
        eps = [(eta - mu) * torch.exp(-ls) for eta, (mu, ls) in zip(etas, mus, strict=True)]
        return torch.cat([x, *eps], dim=1)


def _block(num_units: int = 3) -> InvertibleDenseBlock:
    return InvertibleDenseBlock(
        4,
        num_units=num_units,
        num_layers=1,
        mid_channels=4,
        growth_rate=2,
        net_depth=1,
        net_growth=3,
        num_landmarks=2,
        generator=torch.Generator().manual_seed(0),
    )


def test_dense_block_with_its_noise_passes_the_float64_harness() -> None:
    wrapper = _evaluated(_BlockWithNoise(_block()))
    v = torch.randn(2, 4 + 2 * 2, 1, 2, dtype=torch.float64)
    check_bijection(wrapper, v)


def test_cross_unit_noise_log_density_matches_a_direct_computation() -> None:
    """log q(eta | x) of forward = sum_i log N(eta_i; mu_i(g_i), exp(log_scale_i)) computed with
    torch.distributions from the noise the block drew, and the drawn eta come back from inverse."""
    block = _evaluated(_block())
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    drawn: list[tuple[Tensor, Tensor, Tensor]] = []

    def record(i: int, mu: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
        eta, eps = InvertibleDenseBlock._sample_noise(i, mu, log_scale)
        drawn.append((eta, mu, log_scale))
        return eta, eps

    y, units_log_det, log_q = block.run(x, record)
    direct = sum(
        torch.distributions.Normal(mu, torch.exp(ls)).log_prob(eta).flatten(1).sum(1) for eta, mu, ls in drawn
    )
    torch.testing.assert_close(log_q, direct, atol=1e-10, rtol=0)
    x_back, etas = block.inverse_with_noise(y)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    for eta, (drawn_eta, _, _) in zip(etas, drawn, strict=True):
        torch.testing.assert_close(eta, drawn_eta, atol=1e-10, rtol=0)
    # forward reports the units' log-det minus log q for its own draw.
    torch.manual_seed(5)
    _, reported = block(x)
    torch.manual_seed(5)
    _, units_log_det, log_q = block.run(x, InvertibleDenseBlock._sample_noise)
    torch.testing.assert_close(reported, units_log_det - log_q, atol=1e-10, rtol=0)


def test_conditioning_follows_their_bookkeeping() -> None:
    """Unit i's noise sees cat(x, h_0 .. h_{i-2}): C, 2C, 3C + growth channels for units 1, 2, 3."""
    block = _block(num_units=4)
    assert [net.net[0].in_channels for net in block.noise_nets] == [4, 8, 14]
    assert block.out_channels == 4 + 3 * 2


def test_iterative_inverse_inverts_a_softmax_kernel() -> None:
    kernel = torch.softmax(torch.randn(2, 4, 4, dtype=torch.float64), dim=-2)
    product = kernel @ iterative_inverse(kernel, num_iterations=20)
    torch.testing.assert_close(product, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-6, rtol=0)


def test_nystrom_attention_shapes_and_landmark_check() -> None:
    attention = NystromAttention(6, 3, 4)
    assert attention(torch.randn(2, 6, 4, 4)).shape == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="not divisible by 4 landmarks"):
        attention(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("strategy", ["static", "eiw", "lcma"])
def test_model_round_trip_latents_and_decode(strategy: str) -> None:
    knobs = {"warmup_steps": 1} if strategy == "lcma" else {}
    model = build_flow(tiny_dense(split=SplitConfig(strategy=strategy, **knobs))).double()
    initialize_actnorm(model, images(8, model.cfg.image_shape))
    model.advance(0)
    perturb_parameters(model, scale=0.05)
    model.eval()
    x = model.dequantize(images(4, model.cfg.image_shape, seed=1))
    zs, log_det = model.encode(x)
    assert log_det.shape == (4,) and torch.isfinite(log_det).all()
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    # 3x8x8 -> squeeze 12x4x4 -> block (3 units, growth 2) 16 -> squeeze 64x2x2, split 32 | 32
    # -> block (2 units) 34: the noise adds dimensions, the latents hold them all.
    assert model.latent_shapes == [(32, 2, 2), (34, 2, 2)]
    torch.testing.assert_close(model.decode(zs), x, atol=1e-10, rtol=0)
    samples = model.sample(3, temperature=0.7)
    assert samples.shape == (3, 3, 8, 8) and samples.dtype == torch.uint8


def test_static_eiw_and_lcma_share_every_flow_weight_at_one_seed() -> None:
    states = [
        build_flow(tiny_dense(split=SplitConfig(strategy=s))).state_dict() for s in ("static", "eiw", "lcma")
    ]
    for key, value in states[0].items():
        for other in states[1:]:
            if key in other:
                torch.testing.assert_close(other[key], value, atol=0, rtol=0)


def test_invertible_memory_is_refused_and_checkpoint_gives_the_same_gradients() -> None:
    with pytest.raises(ValueError, match="memory: 'invertible'"):
        tiny_dense(memory="invertible")
    grads = {}
    for mode in ("standard", "checkpoint"):
        model = build_flow(tiny_dense(memory=mode)).double()
        torch.manual_seed(2)  # the cross-unit noise of the ActNorm init, then of the step
        initialize_actnorm(model, images(8, model.cfg.image_shape))
        torch.manual_seed(3)
        model.bits_per_dim(
            images(4, model.cfg.image_shape), generator=torch.Generator().manual_seed(1)
        ).mean().backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["standard"], grads["checkpoint"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_bounds_elbo_and_iwbo() -> None:
    """For the same K draws the IWBO (logsumexp - log K) is never looser than their mean (the ELBO):
    Jensen per image. And bits/dim is -log w / (D log 2)."""
    model = build_flow(tiny_dense()).double()
    initialize_actnorm(model, images(8, model.cfg.image_shape))
    perturb_parameters(model, scale=0.05)
    model.eval()
    x = images(3, model.cfg.image_shape, seed=2)
    torch.manual_seed(0)
    log_w = torch.stack([model.log_weights(x) for _ in range(6)])  # (K, B)
    torch.manual_seed(0)
    iwbo = model.iwbo_bits_per_dim(x, 6, chunk_size=3)
    d_log2 = model.num_dims * math.log(2.0)
    torch.testing.assert_close(iwbo, -(torch.logsumexp(log_w, 0) - math.log(6)) / d_log2, atol=1e-10, rtol=0)
    elbo = -log_w.mean(0) / d_log2
    assert (iwbo <= elbo + 1e-12).all()
    assert (iwbo < elbo).all()  # the noise makes log w vary, so the gap is strict
    torch.manual_seed(0)
    torch.testing.assert_close(model.bits_per_dim(x), -log_w[0] / d_log2, atol=1e-10, rtol=0)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="denseflow.units: one value per level"):
        tiny_dense(num_levels=3)
    with pytest.raises(ValueError, match="denseflow.layers"):
        DenseFlowConfig(units=(1, 2), layers=(1,), mid_channels=(4, 4))
    with pytest.raises(ValueError, match="attention_landmarks"):
        tiny_dense(
            image_shape=(3, 4, 4),
            denseflow=DenseFlowConfig(
                units=(1, 1), layers=(1, 1), mid_channels=(4, 4), attention_landmarks=8
            ),
        )
    with pytest.raises(ValueError, match="base: unknown"):
        tiny_dense(base="realnvp")
