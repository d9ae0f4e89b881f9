"""benchmarks/gpu.py without a GPU: its models are the recipes', its largest-batch search finds the
boundary an out-of-memory error draws, its shard reader decodes what data_prep writes, and its CPU
smoke run (every path: both models, eager and compiled, shards) writes the table and JSON. No timing
is checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[3]



def test_models_are_the_imagenet64_recipes_at_the_given_depth():
    recipe = load_config(REPO / "configs" / "imagenet64.yaml")
    cfg = gpu.imagenet64_model(recipe.model.num_steps)
    assert cfg == recipe.model
    assert gpu.RECIPE_STEPS_PER_LEVEL == recipe.model.num_steps
    assert (gpu.LR, gpu.GRAD_CLIP_NORM) == (recipe.optim.lr, recipe.optim.grad_clip_norm)
    assert gpu.imagenet64_model(8).num_steps == 8
    dense = load_config(REPO / "configs" / "imagenet64_denseflow.yaml")
    assert gpu.imagenet64_denseflow_model() == dense.model
    assert gpu.imagenet64_denseflow_model((1, 1, 4)).denseflow.layers == (1, 1, 4)


def test_benchmark_imports_only_torch_the_standard_library_and_flows():
    import ast

    tree = ast.parse((REPO / "benchmarks" / "gpu.py").read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert roots - set(sys.stdlib_module_names) == {"torch", "flows", "benchmarks"}
    siblings = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks")
    }
    assert siblings == {"benchmarks.gpu_inputs", "benchmarks.gpu_report"}  # not common.py: its own helpers
    for helper in ("gpu_inputs.py", "gpu_report.py"):
        tree = ast.parse((REPO / "benchmarks" / helper).read_text())
        roots = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert roots - set(sys.stdlib_module_names) <= {"torch", "flows"}, helper


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


def write_shard(path: Path, count: int, size: int) -> torch.Tensor:
    """A data_prep-style shard: {key}.png members (PIL-encoded as data_prep does) and {key}.cls."""
    import io
    import tarfile

    import numpy as np

    from data_prep.images import encode_png

    rng = np.random.default_rng(0)
    images = []
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            # Smooth plus noise: PIL's adaptive filtering then uses several PNG row filters.
            ramp = np.linspace(0, 200, size, dtype=np.float64)[None, :, None]
            base = ramp + rng.integers(0, 40, (size, size, 3))
            pixels = base.clip(0, 255).astype(np.uint8)
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            for ext, data in (("png", encode_png(pixels)), ("cls", b"0")):
                info = tarfile.TarInfo(f"img{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return torch.stack(images)


def test_shard_reader_decodes_what_data_prep_writes(tmp_path):
    (tmp_path / "train").mkdir()
    expected = write_shard(tmp_path / "train" / "shard-000000.tar", 5, 16)
    images, rate = gpu.shard_images(tmp_path, 4, 16)
    assert images.dtype == torch.uint8 and torch.equal(images, expected[:4]) and rate > 0
    with pytest.raises(ValueError, match="no 32x32 PNG"):
        gpu.shard_images(tmp_path, 4, 32)


def test_cpu_smoke_run_writes_every_row_and_the_json(capsys, tmp_path):
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "shard-000000.tar", 8, 16)
    out = tmp_path / "result"
    argv = ["--device", "cpu", "--quick", "--compile-backend", "eager", "--out", str(out)]
    assert gpu.main(argv + ["--shards", str(tmp_path / "shards")]) == 0
    text = capsys.readouterr().out
    assert "a smoke run, not GPU numbers" in text and "images from the shards" in text
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | depth | precision | compiled | images/s")
    keys = [tuple(cell.strip() for cell in row.split("|")[1:5]) for row in table[1:]]
    for model in ("glow", "denseflow"):
        assert [k for k in keys if k[0] == model] == [
            (model, "reduced", "fp32", "no"), (model, "reduced", "tf32", "no"),
            (model, "reduced", "bf16", "no"), (model, "reduced", "bf16", "yes"),
            (model, "full", "bf16", "no"),
        ]
    report = json.loads(out.with_suffix(".json").read_text())
    assert {m["model"] for m in report["models"]} == {"glow", "denseflow"}
    for m in report["models"]:
        assert m["full_flops_per_image"] > 0 and m["gradient_bytes"] == 4 * m["parameters"]
    assert all(math.isfinite(r["images_per_s"]) for r in report["rows"])
    assert gpu.main(argv + ["--shards", str(tmp_path / "missing")]) == 2
