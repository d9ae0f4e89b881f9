"""A trained tiny DenseFlow with variational dequantization: the IWBO tightens with K, the test-set
evaluation is seeded and exact, and the saved MLflow model scores with the same estimator."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from flows import FlowConfig, build_flow, initialize_actnorm, training_loss
from flows.config import DenseFlowConfig, DequantizerConfig, SplitConfig
from pipeline.evaluation import evaluate_iwbo, seeded_noise
from pipeline.registry import load_flow_model, save_flow_model
from pipeline.runtime import Runtime

SHAPE = (3, 8, 8)


def structured(n: int, seed: int) -> torch.Tensor:
    """Smooth images (a few gradients and blobs): learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SHAPE[1]), torch.linspace(0, 1, SHAPE[2]), indexing="ij")
    a = torch.rand(n, SHAPE[0], 1, 1, generator=g)
    b = torch.rand(n, SHAPE[0], 1, 1, generator=g)
    img = 255 * (0.5 * a * yy + 0.5 * b * xx + 0.1 * torch.rand(n, *SHAPE, generator=g))
    return img.clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    cfg = FlowConfig(
        base="denseflow",
        dequantization="variational",
        image_shape=SHAPE,
        num_levels=2,
        split_prior="standard",
        init_seed=1,
        split=SplitConfig(strategy="eiw"),
        denseflow=DenseFlowConfig(
            units=(2, 1), layers=(1, 1), mid_channels=(8, 8), growth_rate=2, net_depth=1, net_growth=4
        ),
        dequantizer=DequantizerConfig(
            num_steps=1, context_channels=4, mid_channels=8, depth=1, growth=4, context_depth=1,
            context_growth=4,
        ),
    )
    torch.manual_seed(0)
    model = build_flow(cfg)
    initialize_actnorm(model, structured(32, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        model.advance(step)
        bpd = model.bits_per_dim(structured(16, seed=100 + step))
        loss = training_loss(bpd, model.regularization(), 1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_iwbo_tightens_with_k_on_a_trained_model(trained) -> None:
    x = structured(24, seed=7)
    bounds = {}
    for k in (1, 4, 16):
        with seeded_noise(11, torch.device("cpu")):
            bounds[k] = trained.iwbo_bits_per_dim(x, k, chunk_size=96).mean().item()
    # A (log-likelihood) bound that rises with K: bits/dim fall. The gaps are ~1e-2 bits/dim here,
    # far above the spread of the 24-image means at one seed.
    assert bounds[1] > bounds[4] > bounds[16], bounds


def test_evaluate_iwbo_is_seeded_and_chunking_does_not_change_it(trained) -> None:
    batches = [structured(6, seed=20), structured(5, seed=21)]
    runtime = Runtime()  # one process: the collectives are the identity
    first, count = evaluate_iwbo(trained, batches, runtime=runtime, seed=3, num_samples=4, chunk_size=0)
    again, _ = evaluate_iwbo(trained, batches, runtime=runtime, seed=3, num_samples=4, chunk_size=0)
    other, _ = evaluate_iwbo(trained, batches, runtime=runtime, seed=4, num_samples=4, chunk_size=0)
    assert count == 11 and first == again and first != other
    assert trained.training is False


def test_saved_model_scores_with_the_iwbo_when_asked(trained, tmp_path) -> None:
    path = save_flow_model(trained, tmp_path / "model", test_bpd=5.0)
    loaded = load_flow_model(str(path))
    x = structured(3, seed=9)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    pyfunc = mlflow.pyfunc.load_model(str(path))
    elbo = pyfunc.predict(x.numpy(), params={"seed": 5})
    iwbo = pyfunc.predict(x.numpy(), params={"seed": 5, "num_samples": 8})
    np.testing.assert_array_equal(pyfunc.predict(x.numpy(), params={"seed": 5, "num_samples": 8}), iwbo)
    with torch.no_grad(), seeded_noise(5, torch.device("cpu")):
        want = trained.iwbo_bits_per_dim(x, 8)
    np.testing.assert_allclose(iwbo, want.double().numpy(), rtol=0, atol=1e-6)
    assert np.isfinite(elbo).all() and elbo.shape == iwbo.shape == (3,)
    with pytest.raises(Exception, match="num_samples"):
        pyfunc.predict(x.numpy(), params={"num_samples": 0})
