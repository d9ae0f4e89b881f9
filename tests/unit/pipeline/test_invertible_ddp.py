"""DDP with 2 gloo workers: invertible and checkpoint memory train to the same parameters as standard.

Each worker wraps the training objective exactly as the Ray adapter does (``DistributedDataParallel``
with its defaults: ``find_unused_parameters=False``, ``broadcast_buffers=True``), feeds its own
batches, and runs 3 Adam steps per (strategy, memory mode) in float64. A parameter without a gradient
would make DDP raise at the next step; unequal gradients across ranks would leave unequal parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm
from pipeline.step import TrainingObjective

STRATEGIES = {"eiw": dict(strategy="eiw"), "lcma": dict(strategy="lcma", lcma_warmup_steps=2)}
MODES = ("standard", "invertible", "checkpoint")
STEPS = 3


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, split in STRATEGIES.items():
            for mode in MODES:
                cfg = FlowConfig(
                    image_shape=(3, 8, 8), num_levels=2, num_steps=3, hidden_channels=8,
                    split=SplitConfig(**split), memory=mode,
                )  # fmt: skip
                flow = build_flow(cfg).double()
                if rank == 0:  # rank 0 initialises; the DDP constructor broadcasts its state
                    torch.manual_seed(0)
                    initialize_actnorm(flow, _images(16, seed=99))
                model = DistributedDataParallel(TrainingObjective(flow))
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
                for step in range(STEPS):
                    flow.advance(step)
                    torch.manual_seed(1000 * step + rank)  # dequantization noise: per rank, per step
                    bpd, reg = model(_images(4, seed=10 * step + rank))
                    loss = bpd.mean() + 0.5 * reg
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                results[(name, mode)] = {k: v.detach().clone() for k, v in flow.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_workers_reach_the_same_parameters_in_every_memory_mode(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in STRATEGIES:
        reference = ranks[0][(name, "standard")]
        for mode in MODES:
            for rank in range(2):
                state = ranks[rank][(name, mode)]
                for key, value in reference.items():
                    if value.is_floating_point():
                        torch.testing.assert_close(
                            state[key], value, atol=1e-10, rtol=0, msg=f"{name} {mode} {key}"
                        )
                    else:
                        assert torch.equal(state[key], value), f"{name} {mode} {key}"
        # Training moved the parameters (the comparison is not between untouched initial weights).
        start = build_flow(FlowConfig(image_shape=(3, 8, 8), num_levels=2, num_steps=3, hidden_channels=8))
        key = "levels.0.layers.1.layers.2.net.conv_in.weight"
        assert not torch.allclose(reference[key].float(), start.state_dict()[key])
    assert bool(ranks[0][("lcma", "invertible")]["splits.0.strategy.frozen"])  # LCMA measured, then froze
