"""benchmarks/gpu.py without a GPU: its model is the recipe's, its largest-batch search finds the
boundary an out-of-memory error draws, and its CPU smoke run prints the table. No timing is checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu = load_benchmark()


def test_model_is_the_imagenet64_recipe_at_the_given_depth():
    recipe = load_config(REPO / "configs" / "imagenet64.yaml")
    cfg = gpu.imagenet64_model(recipe.model.num_steps)
    assert cfg == recipe.model
    assert gpu.RECIPE_STEPS_PER_LEVEL == recipe.model.num_steps
    assert (gpu.LR, gpu.GRAD_CLIP_NORM) == (recipe.optim.lr, recipe.optim.grad_clip_norm)
    assert gpu.imagenet64_model(8).num_steps == 8


def test_benchmark_imports_only_torch_the_standard_library_and_flows():
    import ast

    tree = ast.parse((REPO / "benchmarks" / "gpu.py").read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert roots - set(sys.stdlib_module_names) == {"torch", "flows"}


@pytest.mark.parametrize("fits_up_to, start, cap, expected", [
    (37, 4, 100, "37"),
    (3, 4, 100, "3"),
    (0, 4, 100, "none (1 does not fit)"),
    (500, 4, 50, ">= 50 (the cap)"),
])  # fmt: skip
def test_largest_batch_search_finds_the_out_of_memory_boundary(monkeypatch, fits_up_to, start, cap, expected):
    real_step = gpu.Trainer.step
    tried = []

    def step(self, batch, mode, warmup=0):
        tried.append(len(batch))
        if len(batch) > fits_up_to:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_step(self, batch, mode, warmup)

    monkeypatch.setattr(gpu.Trainer, "step", step)
    cfg = gpu.imagenet64_model(1, image_size=8, hidden=4, levels=1)
    assert gpu.largest_batch(cfg, "fp32", torch.device("cpu"), start=start, cap=cap, seed=0) == expected
    assert len(tried) <= 2 + 2 * max(1, cap).bit_length()  # doubling, then bisection


def test_cpu_smoke_run_prints_one_row_per_precision(capsys):
    assert gpu.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "a smoke run, not GPU numbers" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| precision | images/s")
    assert [row.split(" | ")[0] for row in table[1:]] == ["| fp32", "| tf32", "| bf16"]
