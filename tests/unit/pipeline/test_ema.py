"""optim.ema_decay: the average moves on updates only, copies buffers, and resumes bit-exactly.

The resume test trains the tiny config twice with real shards and a real MLflow sqlite store: once
straight through, once crashing before step 6 and re-run (resuming from the step-4 checkpoint). The
final checkpoints' averaged weights must be identical bit for bit, and the MLflow run holds
``test/bits_per_dim_ema`` beside ``test/bits_per_dim``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import build_flow
from pipeline.checkpoint import read_checkpoint
from pipeline.config import load_config, resolve
from pipeline.data import ensure_data
from pipeline.ema import WeightAverage
from pipeline.faults import Faults, InjectedFault
from pipeline.loop import fit

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_the_average_moves_on_updates_only_and_copies_buffers():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.image_shape=[3,8,8]"])
    flow = build_flow(cfg.model)
    ema = WeightAverage(flow, decay=0.75)
    start = [p.detach().clone() for p in ema.flow.parameters()]
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1.0)
        next(b for b in flow.buffers() if b.is_floating_point()).add_(3.0)
    ema.update(flow, torch.tensor(True))  # a skipped step: the weights stay
    assert all(torch.equal(a, b) for a, b in zip(start, ema.flow.parameters(), strict=True))
    ema.update(flow, torch.tensor(False))
    for before, averaged in zip(start, ema.flow.parameters(), strict=True):
        torch.testing.assert_close(averaged, before + 0.25)
    assert all(torch.equal(a, b) for a, b in zip(flow.buffers(), ema.flow.buffers(), strict=True))
    assert not any(p.requires_grad for p in ema.flow.parameters())


def _config(workdir: Path, name: str):
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            "ray.enabled=false", "run.progress_bar=off", "run.num_threads=1", "mlflow.register=false",
            "mlflow.log_model=false", "mlflow.log_checkpoint=false", "optim.ema_decay=0.9",
            f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", f"data.root={workdir / 'data'}",
            f"run.name={name}",
        ],
    )  # fmt: skip
    return resolve(cfg, cwd=workdir)


def test_ema_weights_resume_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = _config(tmp_path, "ema-straight")
    ensure_data(straight.data, straight.model.image_shape)
    threads = torch.get_num_threads()
    try:
        a = fit(straight)
        crashed = _config(tmp_path, "ema-crash")
        with pytest.raises(InjectedFault):
            fit(crashed, faults=Faults(fail_at_step=6))
        b = fit(crashed, faults=Faults(fail_at_step=6))
    finally:
        torch.set_num_threads(threads)
    final_a, final_b = read_checkpoint(a.checkpoint_path), read_checkpoint(b.checkpoint_path)
    assert final_a["step"] == final_b["step"] == 8
    assert final_a["ema"].keys() == final_a["model"].keys()
    for key, value in final_a["ema"].items():
        assert torch.equal(value, final_b["ema"][key]), key
    moved = [
        k
        for k, v in final_a["ema"].items()
        if v.is_floating_point() and not torch.equal(v, final_a["model"][k])
    ]
    assert moved  # the average is not the raw weights
    client = MlflowClient(straight.mlflow.tracking_uri)
    history = client.get_metric_history(b.mlflow_run_id, "test/bits_per_dim_ema")
    assert sorted(m.step for m in history) == [4, 8]
