"""Every bijection in flows/ through the generic float64 harness."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Compose,
    InvConv1x1,
    LearnedTopPrior,
    Split,
    Squeeze,
)
from flows.strategies import StaticSplit
from tests.unit.bijection_harness import check_bijection, perturb_parameters

# name -> (constructor, input shape (B, C, H, W))
BIJECTIONS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "actnorm": (lambda: ActNorm(3), (2, 3, 2, 2)),
    "invconv1x1": (lambda: InvConv1x1(4), (2, 4, 2, 2)),
    "affine_coupling": (lambda: AffineCoupling(4, hidden_channels=5), (2, 4, 2, 2)),
    "affine_coupling_odd": (lambda: AffineCoupling(3, hidden_channels=5), (2, 3, 2, 2)),
    "additive_coupling": (lambda: AdditiveCoupling(4, hidden_channels=5), (2, 4, 2, 2)),
    "squeeze": (lambda: Squeeze(), (2, 1, 4, 4)),
    "split_gaussian": (lambda: Split(4, strategy=StaticSplit(), prior="gaussian"), (2, 4, 2, 2)),
    "split_standard": (lambda: Split(4, strategy=StaticSplit(), prior="standard"), (2, 4, 2, 2)),
    "top_prior": (lambda: LearnedTopPrior(3), (2, 3, 2, 2)),
    "glow_step": (
        lambda: Compose(ActNorm(4), InvConv1x1(4), AffineCoupling(4, hidden_channels=5)),
        (2, 4, 2, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(BIJECTIONS))
def test_bijection_contract(name: str) -> None:
    torch.manual_seed(0)
    make, shape = BIJECTIONS[name]
    bijection = make().double()
    perturb_parameters(bijection)
    x = torch.randn(shape, dtype=torch.float64)
    check_bijection(bijection, x)


def test_harness_catches_a_wrong_log_det() -> None:
    """The harness itself must be able to fail: a coupling whose log_det is off by a constant."""

    class Broken(AffineCoupling):
        def forward(self, x):
            y, log_det = super().forward(x)
            return y, log_det + 0.1

    bijection = Broken(4, hidden_channels=5).double()
    perturb_parameters(bijection)
    with pytest.raises(AssertionError):
        check_bijection(bijection, torch.randn(2, 4, 2, 2, dtype=torch.float64))


def test_invconv_weight_matches_lu_log_det() -> None:
    layer = InvConv1x1(6).double()
    perturb_parameters(layer)
    _, logabsdet = torch.linalg.slogdet(layer.weight())
    torch.testing.assert_close(layer.log_s.sum(), logabsdet)


def test_squeeze_places_pixels_as_documented() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = Squeeze()(x)
    # channel 2i + j holds x[2h + i, 2w + j]
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(y[0, 2 * i + j], x[0, 0, i::2, j::2])


def test_split_rejects_odd_channels() -> None:
    with pytest.raises(ValueError, match="even channel count"):
        Split(3, strategy=StaticSplit())
