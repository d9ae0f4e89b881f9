"""The variational dequantizer q(u | x) (flows/dequantization.py, flows/conditional_coupling.py), float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flows.conditional_coupling import ConditionalAffineCoupling
from flows.config import DequantizerConfig
from flows.dequantization import DequantizationFlow, Sigmoid, Unsqueeze, VariationalDequantizer
from tests.unit.bijection_harness import check_bijection, jacobian_log_det, perturb_parameters

TINY = DequantizerConfig(
    num_steps=2, context_channels=3, mid_channels=4, depth=1, growth=2, context_depth=1, context_growth=2
)
SHAPE = (3, 4, 4)
N_BITS = 5
# The harness's default 0.3 on every weight of three stacked 12x12 LU convs and unbounded coupling
# shifts drives u to 1 - 1e-17 in float64 (sigmoid of ~40); 0.1 keeps u inside (0.003, 0.998).
PERTURB = 0.1


class BoundContext(nn.Module):
    """A conditional bijection with its context fixed: the plain contract, for the harness."""

    def __init__(self, layer: nn.Module, context: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.context = context

    def _context(self, x: Tensor) -> Tensor:
        # One context for every sample (batch 1), so the harness's per-sample Jacobians see it too.
        return self.context.expand(x.shape[0], *self.context.shape[1:])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer(x, context=self._context(x))

    def inverse(self, y: Tensor) -> Tensor:
        return self.layer.inverse(y, context=self._context(y))


def _dequantizer(seed: int = 0, *, perturb: bool = True) -> VariationalDequantizer:
    torch.manual_seed(seed)
    model = VariationalDequantizer(SHAPE, n_bits=N_BITS, cfg=TINY).double()
    if perturb:
        perturb_parameters(model, scale=PERTURB, seed=seed)
    return model


def _levels(batch: int = 2, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**N_BITS, (batch, *SHAPE), generator=g).double()


def test_conditional_coupling_contract() -> None:
    torch.manual_seed(0)
    layer = ConditionalAffineCoupling(4, 3, mid_channels=4, depth=1, growth=2).double()
    perturb_parameters(layer)
    context = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    check_bijection(BoundContext(layer, context), torch.randn(2, 4, 2, 2, dtype=torch.float64))


def test_conditional_coupling_depends_on_context() -> None:
    torch.manual_seed(0)
    layer = ConditionalAffineCoupling(4, 3, mid_channels=4, depth=1, growth=2).double()
    perturb_parameters(layer)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    y1, ld1 = layer(x, context=torch.zeros(2, 3, 2, 2, dtype=torch.float64))
    y2, ld2 = layer(x, context=torch.ones(2, 3, 2, 2, dtype=torch.float64))
    assert not torch.allclose(y1, y2) and not torch.allclose(ld1, ld2)
    torch.testing.assert_close(y1[:, :2], x[:, :2], atol=0, rtol=0)  # first half passes through


def test_sigmoid_and_unsqueeze_contract() -> None:
    check_bijection(Sigmoid(), 2.0 * torch.randn(2, 3, 2, 2, dtype=torch.float64))
    check_bijection(Unsqueeze(), torch.randn(2, 8, 2, 2, dtype=torch.float64))


def test_sigmoid_inverse_rejects_values_outside_open_interval() -> None:
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            Sigmoid().inverse(torch.tensor([[0.5, bad]], dtype=torch.float64))


def test_whole_conditional_flow_contract() -> None:
    torch.manual_seed(0)
    flow = DequantizationFlow(12, 3, TINY).double()
    perturb_parameters(flow, scale=PERTURB)
    context = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    check_bijection(BoundContext(flow, context), torch.randn(2, 12, 2, 2, dtype=torch.float64))


def test_log_q_equals_inversion_and_explicit_jacobian() -> None:
    model = _dequantizer()
    levels = _levels()
    u, log_q = model(levels, generator=torch.Generator().manual_seed(7))
    assert u.shape == levels.shape and u.dtype == torch.float64 and log_q.shape == (2,)
    assert ((u > 0) & (u < 1)).all() and torch.isfinite(log_q).all()

    # Direct: invert the flow on the returned u.
    torch.testing.assert_close(model.log_prob(u, levels), log_q, atol=1e-9, rtol=0)

    # Explicit: the same noise by the same generator, the base density from torch.distributions, and
    # the log-det of eps -> u from the autograd Jacobian of the whole flow at the context of ``levels``.
    noise = torch.randn((2, 12, 2, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        eps = model.base_loc + model.base_log_scale.exp() * noise
        log_base = torch.distributions.Normal(model.base_loc, model.base_log_scale.exp()).log_prob(eps)
        context = model.context_net(2 * levels / (2**N_BITS - 1) - 1)
    log_dets = []
    for i in range(2):
        bound = BoundContext(model.flow, context[i : i + 1])
        torch.testing.assert_close(bound(eps[i : i + 1])[0], u[i : i + 1], atol=1e-12, rtol=0)
        log_dets.append(jacobian_log_det(bound, eps[i : i + 1]))
    explicit = log_base.sum(dim=(1, 2, 3)) - torch.cat(log_dets)
    torch.testing.assert_close(log_q, explicit, atol=1e-8, rtol=0)

    # A different levels tensor gives a different q (the context is used).
    assert not torch.allclose(model.log_prob(u, levels.flip(0)), log_q)


def test_same_generator_same_draw() -> None:
    model = _dequantizer()
    levels = _levels()
    a = model(levels, generator=torch.Generator().manual_seed(3))
    b = model(levels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gradients_reach_every_parameter_from_log_q() -> None:
    model = _dequantizer()
    _, log_q = model(_levels(), generator=torch.Generator().manual_seed(0))
    log_q.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient reaches {name}"


def test_at_init_q_is_a_squeezed_logistic_normal_of_the_base() -> None:
    """Zero-initialised couplings: u = sigmoid(unsqueeze(M eps)), M the product of the 1x1 convs, so
    logit(u) per squeezed pixel is N(M loc, M S^2 M^T) whatever the levels. Checked against that closed
    form (multivariate normal per pixel, minus log u(1 - u) of the logit's Jacobian)."""
    model = _dequantizer(perturb=False)
    with torch.no_grad():
        model.base_loc.copy_(torch.linspace(-1, 1, 12).reshape(1, 12, 1, 1))
        model.base_log_scale.copy_(torch.linspace(-0.5, 0.3, 12).reshape(1, 12, 1, 1))
    levels = _levels(batch=3)
    with torch.no_grad():
        u, log_q = model(levels, generator=torch.Generator().manual_seed(5))
        m = torch.eye(12, dtype=torch.float64)
        for layer in model.flow.layers:
            if hasattr(layer, "weight"):
                m = layer.weight() @ m
        mean = m @ model.base_loc.reshape(12)
        cov = m @ torch.diag(model.base_log_scale.reshape(12).exp() ** 2) @ m.T
        y = torch.log(u) - torch.log1p(-u)  # logit, unsqueezed back to the squeezed grid below
        y_sq = y.reshape(3, 3, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(3, 12, 2, 2)
        mvn = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        log_y = mvn.log_prob(y_sq.permute(0, 2, 3, 1)).sum(dim=(1, 2))
        expected = log_y - (torch.log(u) + torch.log1p(-u)).sum(dim=(1, 2, 3))
        torch.testing.assert_close(log_q, expected, atol=1e-9, rtol=0)
        # ... and q does not depend on the levels yet.
        torch.testing.assert_close(model.log_prob(u, levels.flip(0)), log_q, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 4, 3), (4, 4)])
def test_wrong_image_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="image_shape"):
        VariationalDequantizer(shape, n_bits=N_BITS, cfg=TINY)


def test_wrong_levels_shape_and_u_outside_raise() -> None:
    model = _dequantizer()
    with pytest.raises(ValueError, match="levels"):
        model(torch.zeros(2, 3, 6, 6, dtype=torch.float64))
    u = torch.full((2, *SHAPE), 0.5, dtype=torch.float64)
    u[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        model.log_prob(u, _levels())


def test_float32_default_and_bits_constant() -> None:
    """The module in float32 (the model's default) runs on uint8-valued levels; log_q is finite."""
    torch.manual_seed(0)
    model = VariationalDequantizer(SHAPE, n_bits=8, cfg=TINY)
    levels = torch.randint(0, 256, (2, *SHAPE), dtype=torch.uint8)
    u, log_q = model(levels)
    assert u.dtype == torch.float32 and torch.isfinite(log_q).all()
    assert math.isfinite(float(log_q.detach().mean()))
