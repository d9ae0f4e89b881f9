"""optim.accumulate with DDP: k micro-batches of b per worker make the same step as one batch of k*b.

Two gloo workers each run ``pipeline.step.train_step`` on a DDP-wrapped objective (as the Ray
adapter wraps it) for 3 optimizer steps in float64, once with ``accumulate=2, batch_size=2`` (DDP's
``no_sync`` on the first micro-batch) and once with ``accumulate=1, batch_size=4``, on the same 4
images per worker and step. A BatchNorm-free Glow with a static split: the step's loss is then a
mean over images, which accumulation reproduces exactly (BatchNorm statistics and EIW's batch-level
regulariser are not means over images).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from flows import build_flow, initialize_actnorm
from pipeline.config import load_config
from pipeline.runtime import Runtime
from pipeline.step import TrainingObjective, global_batch, lr_factor, make_optimizer, train_step

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
STEPS = 3


class _GlooRuntime(Runtime):
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def _train(rank: int, accumulate: int, batch_size: int) -> dict[str, torch.Tensor]:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            "model.image_shape=[3,8,8]", "model.split.strategy=static", "ray.num_workers=2",
            f"optim.accumulate={accumulate}", f"data.batch_size={batch_size}", "optim.warmup_steps=1",
            "optim.lr=1e-2",
        ],
    )  # fmt: skip
    assert global_batch(cfg) == 8
    torch.manual_seed(0)
    flow = build_flow(cfg.model).double()
    if rank == 0:
        initialize_actnorm(flow, _images(8, seed=99))
    objective = DistributedDataParallel(TrainingObjective(flow))
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    runtime = _GlooRuntime(rank, 2)
    for step in range(STEPS):
        flow.advance(step)
        torch.manual_seed(1000 * step + rank)  # dequantization noise: per rank, per step
        result = train_step(
            objective, _images(4, seed=10 * step + rank), optimizer, scheduler, cfg=cfg, runtime=runtime
        )
        assert not result.skipped
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {"accumulate": _train(rank, 2, 2), "whole": _train(rank, 1, 4)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulated_micro_batches_equal_one_batch_with_two_gloo_workers(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = ranks[0]["whole"]
    start = build_flow(load_config(CONFIGS / "tiny.yaml", ["model.image_shape=[3,8,8]"]).model).state_dict()
    key = "levels.0.layers.1.layers.2.net.conv_in.weight"
    assert not torch.allclose(whole[key], start[key].double())  # the steps moved the weights
    for rank in range(2):
        for name in ("accumulate", "whole"):
            for key, value in whole.items():
                got = ranks[rank][name][key]
                if value.is_floating_point():
                    torch.testing.assert_close(got, value, atol=1e-10, rtol=1e-9, msg=f"{rank} {name} {key}")
                else:
                    assert torch.equal(got, value), f"{rank} {name} {key}"
