"""A generic float64 test harness for anything that follows the bijection contract.

Every check works on tiny inputs so the full autograd Jacobian (D x D) is cheap. Parameters are
perturbed away from their initial values first: zero-initialised convs make couplings start as the
identity, and a harness that only ever sees the identity proves nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def perturb_parameters(module: nn.Module, *, scale: float = 0.3, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def flat_forward(bijection: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    y, log_det = bijection(x)
    if isinstance(y, list | tuple):
        y = torch.cat([t.reshape(t.shape[0], -1) for t in y], dim=1)
    return y.reshape(y.shape[0], -1), log_det


def jacobian_log_det(bijection: nn.Module, x: Tensor) -> Tensor:
    """log|det dy/dx| per sample from the autograd Jacobian: (B, ...) -> (B,)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def f(v: Tensor, shape: torch.Size = xi.shape) -> Tensor:
            return flat_forward(bijection, v.reshape(shape))[0][0]

        jac = torch.autograd.functional.jacobian(f, xi.reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0, "Jacobian is singular"
        out.append(logabsdet)
    return torch.stack(out)


def check_bijection(bijection: nn.Module, x: Tensor, *, atol: float = 1e-9) -> None:
    """Round trip, log_det shape, log_det against autograd, inverse log-det, gradient to every parameter."""
    bijection = bijection.double()
    x = x.double()
    y, log_det = bijection(x)
    assert log_det.shape == (x.shape[0],), f"log_det must be (B,), got {tuple(log_det.shape)}"
    assert y.shape[0] == x.shape[0] and y[0].numel() == x[0].numel()
    x_back = bijection.inverse(y)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)

    # log_det(forward) + log_det(inverse) = 0: the inverse's log-det from autograd on y.
    inverse_module = _Inverse(bijection)
    torch.testing.assert_close(
        jacobian_log_det(inverse_module, y.detach()), -log_det.detach(), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(jacobian_log_det(bijection, x), log_det.detach(), atol=1e-7, rtol=0)

    bijection.zero_grad()
    x = x.clone().requires_grad_(True)
    y, log_det = bijection(x)
    (y.pow(2).sum() - log_det.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "no finite gradient reaches the input"
    for name, p in bijection.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient reaches {name}"


class _Inverse(nn.Module):
    """Wraps ``inverse`` as a forward map so its Jacobian can be taken; log_det unused."""

    def __init__(self, bijection: nn.Module) -> None:
        super().__init__()
        self.bijection = bijection

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.inverse(y), y.new_zeros(y.shape[0])
