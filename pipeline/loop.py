"""The plain training loop ``fit``, read top to bottom (the step math is in pipeline/step.py).

``fit(cfg)`` runs in one process with no Ray (``LocalRuntime``); the Ray Train adapter calls the same
``fit`` on every worker with a ``RayRuntime`` (pipeline/ray_adapter.py). Nothing here imports Ray or
``torch.distributed``: the runtime provides rank, device, collectives and checkpoint storage.

``flows.strategies.advance(flow, step)`` runs before every step's forward on every rank (it freezes
EIW/LCMA permutations at their configured steps and re-attaches LCMA's measurement after a resume).
Order of a fresh start: build the flow, initialise ActNorm on rank 0's first batch, then let the
runtime wrap it (DDP's constructor broadcasts rank 0's parameters and buffers to every replica).
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flows import FlowModel, build_flow, initialize_actnorm
from flows.strategies import advance
from pipeline.checkpoint import checkpoint_name, read_checkpoint, rng_state, set_rng_state, write_checkpoint
from pipeline.config import TrainConfig, checkpoint_root, config_to_dict, config_to_yaml, flatten
from pipeline.data import ensure_data, make_eval_loader, make_train_loader
from pipeline.runtime import LocalRuntime, Runtime
from pipeline.sampling import sample_grids, save_grids
from pipeline.step import TrainingObjective, evaluate, lr_factor, make_optimizer, train_step
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_VERSION_TAG = "pipeline.model_version"
FINAL_STEP_TAG = "pipeline.final_step"  # the step whose model was logged: a re-run does not log it twice


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for ``run.max_nonfinite_in_row`` steps in a row."""


class InjectedFault(RuntimeError):
    """Raised by the ``run.fail_at_step`` test hook."""


@dataclass(kw_only=True)
class FitResult:
    step: int
    test_bits_per_dim: float
    mlflow_run_id: str | None
    model_version: str | None
    images_per_s: float
    skipped_steps: int


# ------------------------------------------------------------------------------------ helpers
def _maybe_inject_fault(cfg: TrainConfig, runtime: Runtime, step: int) -> None:
    """``run.fail_at_step``: raise once, in the last rank, right before that step (a marker file in
    the run's shared directory makes it fire on the first attempt only)."""
    if cfg.run.fail_at_step != step or runtime.rank != runtime.world_size - 1:
        return
    marker = runtime.run_dir / f".fault-injected-step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFault(f"run.fail_at_step={step}: injected worker failure in rank {runtime.rank}")


def _show_progress(cfg: TrainConfig, runtime: Runtime) -> bool:
    if not runtime.is_main or cfg.run.progress_bar is False:
        return False
    return cfg.run.progress_bar is True or sys.stderr.isatty()


def _final_artifacts(
    tracker: Tracker, cfg: TrainConfig, flow: FlowModel, state: dict, test_bpd: float, step: int
) -> str | None:
    """Rank 0 after the last step: config, final samples and checkpoint, the model, registration."""
    from pipeline.registry import log_flow_model, register

    with tempfile.TemporaryDirectory(prefix="eiw-final-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_to_yaml(cfg), encoding="utf-8")
        tracker.log_artifacts([config_path])
        grids = sample_grids(flow, cfg.run.sample_temperatures, num=cfg.run.num_samples, seed=cfg.run.seed)
        tracker.log_artifacts(save_grids(grids, Path(tmp) / "samples", step=step), "samples")
        if cfg.mlflow.log_checkpoint:
            final = write_checkpoint(Path(tmp) / checkpoint_name(step), state, config_to_yaml(cfg))
            tracker.log_artifacts([final], f"checkpoint/{final.name}")
    version = None
    if cfg.mlflow.log_model:
        model_uri = log_flow_model(flow, test_bpd=test_bpd)
        if cfg.mlflow.register:
            version = str(
                register(model_uri, cfg=cfg.mlflow, test_bpd=test_bpd, run_id=tracker.run_id).version
            )
            tracker.set_tags({MODEL_VERSION_TAG: version})
    tracker.set_tags({FINAL_STEP_TAG: str(step)})
    return version


# ----------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, *, runtime: Runtime | None = None) -> FitResult:
    """Train ``cfg`` to ``cfg.total_steps`` (resuming from the runtime's latest checkpoint)."""
    if runtime is None:
        runtime = LocalRuntime(checkpoint_root(cfg) / cfg.run.name, num_to_keep=cfg.run.keep_checkpoints)
    device, rank = runtime.device, runtime.rank
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    ensure_data(cfg.data, cfg.model.image_shape, build=isinstance(runtime, LocalRuntime))
    torch.manual_seed(cfg.run.seed * 1000 + rank)
    random.seed(cfg.run.seed * 1000 + rank)

    flow = build_flow(cfg.model).to(device)
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    train_loader = make_train_loader(cfg.data, seed=cfg.run.seed)

    step, skipped_total, run_id, test_bpd = 0, 0, None, float("nan")
    with runtime.latest_checkpoint() as ckpt_dir:
        state = read_checkpoint(ckpt_dir, map_location=device) if ckpt_dir is not None else None
    if state is not None:
        flow.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, skipped_total = state["step"], state["skipped_steps"]
        run_id, test_bpd = state["mlflow_run_id"], state["test_bits_per_dim"]
        if len(state["rng"]) == runtime.world_size:
            set_rng_state(state["rng"][rank], device)
        log.info("rank %d: resumed from %s at step %d", rank, ckpt_dir, step)
    advance(flow, step)
    if state is None and runtime.is_main:
        train_loader.set_epoch(0)
        first = next(iter(train_loader))
        initialize_actnorm(flow, first.to(device))
    objective = runtime.wrap(TrainingObjective(flow))

    tracker = Tracker(cfg.mlflow, active=runtime.is_main, run_root=cfg.run.root)
    tracker.start(
        run_id=run_id,
        run_name=cfg.run.name,
        params=flatten(config_to_dict(cfg)),
        tags={
            "pipeline.world_size": str(runtime.world_size),
            "pipeline.device": device.type,
            **({"pipeline.resumed_from_step": str(step)} if state is not None else {}),
        },
    )

    total, per_epoch = cfg.total_steps, cfg.data.batches_per_epoch
    images_per_step = cfg.data.batch_size * runtime.world_size
    bar = tqdm(
        total=total, initial=step, disable=not _show_progress(cfg, runtime), unit="step", dynamic_ncols=True
    )
    say = (bar.write if not bar.disable else log.info) if runtime.is_main else (lambda _msg: None)
    window = {"bpd": 0.0, "reg": 0.0, "norm": 0.0, "n": 0, "skipped": 0}
    steady_images, steady_seconds = 0, 0.0
    in_a_row = 0
    status = "FAILED"

    def make_state() -> dict:
        rngs = runtime.all_gather_object(rng_state(device))  # collective: every rank calls make_state
        return {
            "step": step,
            "model": flow.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "config": config_to_dict(cfg),
            "mlflow_run_id": tracker.run_id,
            "skipped_steps": skipped_total,
            "test_bits_per_dim": test_bpd,
        }

    try:
        clock = time.perf_counter()
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            for _ in range(offset):  # replay to the resume point: the same data order as without a restart
                next(batches)
            for batch in batches:
                _maybe_inject_fault(cfg, runtime, step + 1)
                advance(flow, step)
                poison = 0 < cfg.run.nan_loss_from_step <= step + 1
                result = train_step(
                    objective,
                    batch.to(device, non_blocking=True),
                    optimizer,
                    scheduler,
                    cfg=cfg,
                    runtime=runtime,
                    poison=poison,
                )
                step += 1
                bar.update(1)
                if result.skipped:
                    skipped_total += 1
                    in_a_row += 1
                    window["skipped"] += 1
                    if in_a_row >= cfg.run.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"loss or gradient non-finite for {in_a_row} steps in a row (step {step}); "
                            f"stopping. The last good checkpoint is intact in {runtime.run_dir}; lower "
                            "optim.lr, raise optim.warmup_steps or check the data, then re-run to resume."
                        )
                else:
                    in_a_row = 0
                    window["bpd"] += result.bits_per_dim
                    window["reg"] += result.regularizer
                    window["norm"] += result.grad_norm
                    window["n"] += 1

                if step % cfg.run.log_every == 0 or step == total:
                    seconds = time.perf_counter() - clock
                    steps_in_window = window["n"] + window["skipped"]
                    speed = steps_in_window * images_per_step / max(seconds, 1e-9)
                    if step > cfg.run.log_every:  # the first window holds start-up costs
                        steady_images += steps_in_window * images_per_step
                        steady_seconds += seconds
                    n = max(window["n"], 1)
                    lr = scheduler.get_last_lr()[0]
                    metrics = {
                        "train/bits_per_dim": window["bpd"] / n,
                        "train/regularizer": window["reg"] / n,
                        "train/grad_norm": window["norm"] / n,
                        "train/images_per_s": speed,
                        "train/lr": lr,
                        "train/skipped_steps": float(skipped_total),
                    }
                    if window["n"] == 0:
                        metrics = {
                            k: v
                            for k, v in metrics.items()
                            if k.split("/")[1] not in ("bits_per_dim", "regularizer", "grad_norm")
                        }
                    tracker.record(step, metrics)
                    bpd_text = f"{window['bpd'] / n:.4f}" if window["n"] else "nan"
                    say(
                        f"step {step}/{total} | bits/dim {bpd_text} | {speed:.1f} images/s | lr {lr:.2e}"
                        + (f" | skipped {window['skipped']}" if window["skipped"] else "")
                    )
                    bar.set_postfix(bpd=bpd_text, refresh=False)
                    window = {"bpd": 0.0, "reg": 0.0, "norm": 0.0, "n": 0, "skipped": 0}
                    clock = time.perf_counter()

                end_of_epoch = step % per_epoch == 0
                if (end_of_epoch and (step // per_epoch) % cfg.run.eval_every_epochs == 0) or step == total:
                    test_bpd, count = evaluate(
                        flow,
                        make_eval_loader(cfg.data, rank=rank, world_size=runtime.world_size),
                        runtime=runtime,
                        seed=cfg.run.seed,
                    )
                    tracker.record(step, {"test/bits_per_dim": test_bpd})
                    say(f"step {step}/{total} | test bits/dim {test_bpd:.4f} over {count} images")
                    if runtime.is_main and step != total:
                        grids = sample_grids(
                            flow, cfg.run.sample_temperatures, num=cfg.run.num_samples, seed=cfg.run.seed
                        )
                        with tempfile.TemporaryDirectory(prefix="eiw-samples-") as tmp:
                            tracker.log_artifacts(save_grids(grids, tmp, step=step), "samples")
                    clock = time.perf_counter()

                if step % cfg.run.checkpoint_every == 0 or step == total:
                    state = make_state()
                    writer = (
                        (lambda d, s=state: write_checkpoint(d, s, config_to_yaml(cfg)))
                        if runtime.is_main
                        else None
                    )
                    runtime.save_checkpoint(
                        writer,
                        name=checkpoint_name(step),
                        metrics={
                            "step": step,
                            "test_bits_per_dim": test_bpd,
                            "images_per_s": steady_images / steady_seconds
                            if steady_seconds
                            else float("nan"),
                            "mlflow_run_id": tracker.run_id or "",
                        },
                    )
                    tracker.flush()  # only now: these steps are covered by a durable checkpoint
                    clock = time.perf_counter()
                if step >= total:
                    break

        version = tracker.get_tag(MODEL_VERSION_TAG)
        if runtime.is_main and tracker.get_tag(FINAL_STEP_TAG) != str(step):
            assert state is not None, "the last step always checkpoints"
            version = _final_artifacts(tracker, cfg, flow, state, test_bpd, step)
        elif runtime.is_main:
            say(f"step {step}: already finished and logged (model version {version}); nothing to do")
        status = "FINISHED"
    except BaseException as e:
        tracker.set_tags({"pipeline.failure": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        bar.close()
        tracker.end(status)
    return FitResult(
        step=step,
        test_bits_per_dim=test_bpd,
        mlflow_run_id=tracker.run_id,
        model_version=version,
        images_per_s=steady_images / steady_seconds if steady_seconds else float("nan"),
        skipped_steps=skipped_total,
    )
