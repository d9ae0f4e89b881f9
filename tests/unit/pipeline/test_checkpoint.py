"""Checkpoint round trip (model, optimizer, scheduler, RNG), atomic commit and retention."""

from __future__ import annotations

import os
import random

import pytest
import torch

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm
from pipeline.checkpoint import (
    LocalCheckpoints,
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from pipeline.rng import rng_state, set_rng_state

CPU = torch.device("cpu")


def small_flow():
    return build_flow(
        FlowConfig(
            image_shape=(3, 8, 8),
            num_levels=2,
            num_steps=1,
            hidden_channels=8,
            split=SplitConfig(strategy="static"),
        )
    )


def trained_state():
    torch.manual_seed(0)
    flow = small_flow()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    initialize_actnorm(flow, x)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(3):
        optimizer.zero_grad()
        flow.bits_per_dim(x).mean().backward()
        optimizer.step()
        scheduler.step()
    return flow, optimizer, scheduler, x


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    flow, optimizer, scheduler, x = trained_state()
    random.seed(7)
    torch.manual_seed(7)
    state = {
        "step": 3,
        "model": flow.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": [rng_state(CPU)],
        "mlflow_run_id": "abc",
    }
    write_checkpoint(tmp_path / "ckpt", state, "run:\n  name: x\n")
    expected_torch, expected_py = torch.rand(3), random.random()

    loaded = read_checkpoint(tmp_path / "ckpt")
    assert loaded["step"] == 3 and loaded["mlflow_run_id"] == "abc"
    assert (tmp_path / "ckpt" / "config.yaml").read_text() == "run:\n  name: x\n"
    fresh = small_flow()
    fresh.load_state_dict(loaded["model"])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(fresh.bits_per_dim(x, generator=g1), flow.bits_per_dim(x, generator=g2))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(loaded["optimizer"])
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: min(1.0, (s + 1) / 10))
    fresh_sched.load_state_dict(loaded["scheduler"])
    assert fresh_sched.last_epoch == 3 and fresh_sched.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(fresh_opt.state.values(), optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    torch.manual_seed(123)
    random.seed(123)
    set_rng_state(loaded["rng"][0], CPU)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py


def test_reading_a_non_checkpoint_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_checkpoint(tmp_path)


def test_commit_is_atomic_and_keeps_the_newest(tmp_path):
    store = LocalCheckpoints(tmp_path / "run", num_to_keep=2)
    assert store.latest() is None
    for step in (2, 4, 6):
        staged = store.staging(checkpoint_name(step))
        write_checkpoint(staged, {"step": step}, "")
        # Invisible until committed.
        assert store.latest() is None or store.latest().name != checkpoint_name(step)
        store.commit(staged, checkpoint_name(step))
    assert [p.name for p in store.all()] == [checkpoint_name(4), checkpoint_name(6)]
    assert read_checkpoint(store.latest())["step"] == 6
    # A half-written directory (a crash before commit) is never taken for a checkpoint.
    (tmp_path / "run" / ".tmp-checkpoint_000000008.1").mkdir()
    (tmp_path / "run" / checkpoint_name(9)).mkdir()  # no state.pt
    assert store.latest().name == checkpoint_name(6)
    # Re-reaching a step after a resume replaces that checkpoint.
    staged = store.staging(checkpoint_name(6))
    write_checkpoint(staged, {"step": 6, "again": True}, "")
    store.commit(staged, checkpoint_name(6))
    assert read_checkpoint(store.latest())["again"] is True
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".tmp-old")]


def test_checkpoints_are_ours_by_name_and_ordered_by_step(tmp_path):
    for name in (
        "checkpoint_000000010",
        "checkpoint_000000008-1",
        "checkpoint_000000008",
        "checkpoint_notes",
    ):
        write_checkpoint(tmp_path / name, {"step": 0}, "")
    (tmp_path / "checkpoint_000000012").mkdir()  # no state.pt: not a checkpoint
    names = [p.name for p in list_checkpoints(tmp_path)]
    # checkpoint_<step>-1: the step written again under a name Ray does not hold yet (ray_adapter.py)
    assert names == ["checkpoint_000000008", "checkpoint_000000008-1", "checkpoint_000000010"]
    store = LocalCheckpoints(tmp_path, num_to_keep=1)
    staged = store.staging(checkpoint_name(14))
    write_checkpoint(staged, {"step": 14}, "")
    store.commit(staged, checkpoint_name(14))
    # Retention removes only our checkpoints; a folder that merely starts with checkpoint_ stays.
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_000000012",
        "checkpoint_000000014",
        "checkpoint_notes",
    ]
