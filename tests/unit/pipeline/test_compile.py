"""run.compile: compiled and eager training agree, and later steps reuse the first step's graphs.

Inductor's CPU backend (gcc) compiles the tiny Glow (EIW split) and the tiny DenseFlow at 8x8: 136 s
and 110 s with a cold inductor cache on the shared 2-core VM at load 7-10 (seconds with a warm one),
so these are the only compiled training tests. ``fallback_random`` makes inductor draw the
dequantization and cross-unit noise with eager's generator (training runs keep inductor's faster
draws), so both runs see the same noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from flows import build_flow, initialize_actnorm
from pipeline.config import load_config
from pipeline.device_settings import choose_settings, compile_objective
from pipeline.runtime import Runtime
from pipeline.step import TrainingObjective, lr_factor, make_optimizer, train_step

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
STEPS = 3


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def _train(cfg, *, compiled: bool) -> tuple[list[float], int]:
    """Bits/dim of each of STEPS steps, and the graphs compiled after the first step."""
    torch.manual_seed(0)
    flow = build_flow(cfg.model)
    initialize_actnorm(flow, _images(8, seed=99))
    settings = choose_settings(
        "cpu", cfg.model_copy(update={"run": cfg.run.model_copy(update={"compile": compiled})})
    )
    assert settings.compile is compiled
    objective = compile_objective(TrainingObjective(flow), settings)
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    values, graphs_after_first = [], 0
    for step in range(STEPS):
        flow.advance(step)
        torch.manual_seed(1000 + step)
        result = train_step(
            objective, _images(4, seed=step), optimizer, scheduler, cfg=cfg, runtime=Runtime()
        )
        values.append(float(result.bits_per_dim))
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    return values, counters["stats"]["unique_graphs"] - graphs_after_first


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny_denseflow.yaml"])
def test_compiled_training_matches_eager_and_does_not_recompile(config):
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._inductor.config.patch(fallback_random=True):
            cfg = load_config(CONFIGS / config, ["model.image_shape=[3,8,8]", "optim.warmup_steps=1"])
            eager, _ = _train(cfg, compiled=False)
            compiled, new_graphs = _train(cfg, compiled=True)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert new_graphs == 0, f"steps 2-{STEPS} compiled {new_graphs} more graphs (recompiles)"
    for step, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step + 1}: eager {a} vs compiled {b}"
    assert eager[0] != eager[-1]  # the steps trained (the comparison is not of one fixed forward)


def test_compile_refuses_invertible_memory_only_and_auto_stays_eager_on_cpu():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.memory=invertible", "run.compile=true"])
    with pytest.raises(ValueError, match="run.compile: true cannot be used: model.memory=invertible"):
        choose_settings("cuda", cfg)
    auto = load_config(CONFIGS / "tiny.yaml", ["model.memory=invertible"])
    assert not choose_settings("cuda", auto).compile
    assert "custom autograd" in choose_settings("cuda", auto).compile_note
    plain = load_config(CONFIGS / "tiny.yaml")
    assert choose_settings("cuda", plain).compile and not choose_settings("cpu", plain).compile
    dense = load_config(CONFIGS / "tiny_denseflow.yaml")
    assert choose_settings("cuda", dense).compile and not choose_settings("cpu", dense).compile
