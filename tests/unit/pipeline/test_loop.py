"""The plain training loop in one process, no Ray: learning, non-finite steps, resume, exact eval.

Real shards (the built-in sample set, tiny) and a real MLflow sqlite store in a temporary directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import build_flow, initialize_actnorm
from pipeline.checkpoint import LocalCheckpoints, read_checkpoint
from pipeline.config import TrainConfig, checkpoint_root
from pipeline.data import ensure_data, make_eval_loader, make_train_loader
from pipeline.faults import Faults, InjectedFault
from pipeline.loop import FitResult, NonFiniteLossError, fit
from pipeline.runtime import LocalRuntime
from pipeline.step import TrainingObjective, evaluate, lr_factor, make_optimizer, train_step
from tests.unit.pipeline.tiny_run import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_cfg(workdir) -> TrainConfig:
    cfg = tiny_config(workdir)
    ensure_data(cfg.data, cfg.model.image_shape)
    return cfg


def test_loss_decreases_in_a_handful_of_steps(data_cfg):
    cfg = tiny_config(Path(data_cfg.run.root).parent, "optim.lr=2e-3", "optim.warmup_steps=1")
    runtime = LocalRuntime(Path(cfg.run.root) / "unused", num_to_keep=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    flow = build_flow(cfg.model)
    loader = make_train_loader(cfg.data, seed=0)
    batches = [b for _, b in zip(range(2), loader, strict=False)]
    initialize_actnorm(flow, batches[0])
    objective = TrainingObjective(flow)
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    losses = [
        train_step(objective, batches[i % 2], optimizer, scheduler, cfg=cfg, runtime=runtime).bits_per_dim
        for i in range(12)
    ]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


def test_nonfinite_step_is_skipped_and_leaves_the_model_alone(data_cfg):
    cfg = data_cfg
    runtime = LocalRuntime(Path(cfg.run.root) / "unused", num_to_keep=1, device=torch.device("cpu"))
    flow = build_flow(cfg.model)
    batch = next(iter(make_train_loader(cfg.data, seed=1)))
    initialize_actnorm(flow, batch)
    objective = TrainingObjective(flow)
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    before = {k: v.clone() for k, v in flow.state_dict().items()}

    bad = train_step(objective, batch, optimizer, scheduler, cfg=cfg, runtime=runtime, poison=True)
    assert bad.skipped and not math.isfinite(bad.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    # Adam's moments and step counts were never touched by the NaN gradients (the skip is applied on
    # the device, so the state the step created is put back to its initial zeros)
    assert all(not torch.any(v) for s in optimizer.state.values() for v in s.values())

    good = train_step(objective, batch, optimizer, scheduler, cfg=cfg, runtime=runtime)
    assert not good.skipped and math.isfinite(good.bits_per_dim)
    assert any(not torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_evaluate_reads_every_test_image_once_and_is_reproducible(data_cfg):
    cfg = data_cfg
    runtime = LocalRuntime(Path(cfg.run.root) / "unused", num_to_keep=1, device=torch.device("cpu"))
    flow = build_flow(cfg.model)
    initialize_actnorm(flow, next(iter(make_train_loader(cfg.data, seed=0))))
    bpd, count = evaluate(flow, make_eval_loader(cfg.data, rank=0, world_size=1), runtime=runtime, seed=0)
    again, _ = evaluate(flow, make_eval_loader(cfg.data, rank=0, world_size=1), runtime=runtime, seed=0)
    assert count == cfg.data.sample.num_test
    assert bpd == again and 0 < bpd < 16
    # The two halves of a 2-rank split hold every image exactly once.
    halves = [sum(b.shape[0] for b in make_eval_loader(cfg.data, rank=r, world_size=2)) for r in (0, 1)]
    assert sum(halves) == cfg.data.sample.num_test and min(halves) > 0


def test_persistent_nonfinite_loss_stops_with_the_last_good_checkpoint(data_cfg):
    workdir = Path(data_cfg.run.root).parent
    cfg = tiny_config(workdir, "run.name=nan-stop", "run.max_nonfinite_in_row=2")
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row") as info:
        fit(cfg, faults=Faults(nan_loss_from_step=5))
    assert "last good checkpoint" in str(info.value)
    latest = LocalCheckpoints(checkpoint_root(cfg) / cfg.run.name, num_to_keep=2).latest()
    assert latest is not None and latest.name == "checkpoint_000000004"
    state = read_checkpoint(latest)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["pipeline.failure"]


def test_crash_and_rerun_resumes_the_same_run_without_duplicate_steps(data_cfg):
    workdir = Path(data_cfg.run.root).parent
    cfg = tiny_config(workdir, "run.name=resume", "run.log_every=1")
    faults = Faults(fail_at_step=6)
    with pytest.raises(InjectedFault):
        fit(cfg, faults=faults)
    first = LocalCheckpoints(checkpoint_root(cfg) / cfg.run.name, num_to_keep=2).latest()
    assert first is not None and read_checkpoint(first)["step"] == 4
    run_id = read_checkpoint(first)["mlflow_run_id"]

    result = fit(cfg, faults=faults)  # resumes from step 4; the fault marker keeps it from firing again
    assert result.step == cfg.total_steps == 8
    assert result.mlflow_run_id == run_id
    assert result.skipped_steps == 0 and math.isfinite(result.test_bits_per_dim)
    assert result.checkpoint_path is not None and read_checkpoint(result.checkpoint_path)["step"] == 8
    client = MlflowClient(cfg.mlflow.tracking_uri)
    steps = [m.step for m in client.get_metric_history(run_id, "train/bits_per_dim")]
    assert sorted(steps) == list(range(1, 9)), steps  # every step once: 5 was never logged twice
    test_steps = [m.step for m in client.get_metric_history(run_id, "test/bits_per_dim")]
    assert sorted(test_steps) == [4, 8]
    assert client.get_run(run_id).info.status == "FINISHED"
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert any(p.endswith("_T0.7.png") for p in artifacts), artifacts
    # The split strategy's diagnostics: logged at every log step, and the final values in the result.
    assert cfg.model.split.strategy == "eiw" and "split0/w_entropy" in result.diagnostics
    for key in result.diagnostics:
        diag_steps = [m.step for m in client.get_metric_history(run_id, f"diag/{key}")]
        assert sorted(diag_steps) == list(range(1, 9)), (key, diag_steps)
    params = client.get_run(run_id).data.params
    assert params["optim.lr"] == str(cfg.optim.lr) and not any("fail_at_step" in k for k in params)
    mlflow.end_run()


def test_local_run_returns_the_registered_version_and_a_rerun_logs_nothing_twice(data_cfg):
    workdir = Path(data_cfg.run.root).parent
    cfg = tiny_config(
        workdir, "run.name=registered", "mlflow.log_model=true", "mlflow.register=true",
        "mlflow.registered_model=loop-test", "run.epochs=1",
    )  # fmt: skip
    result = fit(cfg)
    assert result.step == 4 and result.model_version == "1"
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert str(client.get_model_version_by_alias("loop-test", cfg.mlflow.newest_alias).version) == "1"
    again = fit(cfg)  # finished already: the same result, no second model version
    assert (again.step, again.model_version, again.mlflow_run_id) == (4, "1", result.mlflow_run_id)
    assert len(client.search_model_versions("name = 'loop-test'")) == 1
    mlflow.end_run()


def test_fit_result_survives_the_ray_report():
    result = FitResult(
        step=8, test_bits_per_dim=5.5, mlflow_run_id="abc", model_version=None, images_per_s=12.0,
        skipped_steps=1, diagnostics={"split0/churn": 0.25}, checkpoint_path="/x",
    )  # fmt: skip
    report = result.as_report()
    assert report["diag/split0/churn"] == 0.25 and report["model_version"] == ""
    assert FitResult.from_report(report, checkpoint_path="/x") == result


def test_invertible_memory_logs_its_rebuild_error_at_every_log_step(data_cfg):
    workdir = Path(data_cfg.run.root).parent
    cfg = tiny_config(workdir, "run.name=invertible", "run.log_every=2", "model.memory=invertible")
    result = fit(cfg)
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        result.mlflow_run_id, "memory/level0/rebuild_error"
    )
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    assert all(0.0 <= m.value < 1e-2 for m in history)  # float32 inverses of a tiny flow: tiny drift
    mlflow.end_run()
