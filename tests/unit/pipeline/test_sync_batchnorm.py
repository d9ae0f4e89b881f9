"""ray.sync_batchnorm: DenseFlow's BatchNorm becomes SyncBatchNorm with the same state, GPU workers only.

What a CPU can show: the conversion keeps every parameter and buffer (checkpoints load either way)
and, without a process group, trains exactly like BatchNorm. torch 2.14's SyncBatchNorm raises for
CPU tensors once a process group is initialised (torch/nn/modules/batchnorm.py, "expected input
tensor to be on GPU"), so gloo workers are refused with the key named; the statistics over 8 ranks
are what only a GPU run shows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from flows import build_flow
from pipeline.config import load_config
from pipeline.runtime import with_sync_batchnorm

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_sync_batchnorm_keeps_the_state_and_trains_like_batchnorm_in_one_process():
    cfg = load_config(CONFIGS / "tiny_denseflow.yaml", ["model.image_shape=[3,8,8]"])
    torch.manual_seed(0)
    flow = build_flow(cfg.model)
    synced = with_sync_batchnorm(copy.deepcopy(flow), torch.device("cuda"))  # a device name: no GPU used
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert flow.state_dict().keys() == synced.state_dict().keys()
    for model in (flow, synced):
        torch.manual_seed(1)
        model.bits_per_dim(_images(4)).mean().backward()
    torch.testing.assert_close(flow.state_dict(), synced.state_dict(), rtol=0, atol=0)  # running stats
    for (name, p), q in zip(flow.named_parameters(), synced.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_sync_batchnorm_refuses_cpu_workers_naming_the_key():
    flow = build_flow(load_config(CONFIGS / "tiny_denseflow.yaml", ["model.image_shape=[3,8,8]"]).model)
    with pytest.raises(ValueError, match="ray.sync_batchnorm: .*GPU workers"):
        with_sync_batchnorm(flow, torch.device("cpu"))
