"""The plain training loop ``fit``, read top to bottom (the step math is in pipeline/step.py).

``fit`` builds the run's collaborators once (``Trainer``: state, runtime, tracker, console, metric
window) and reads top to bottom: train a step; ``should_log``, ``should_eval``, ``should_checkpoint``.

``fit(cfg)`` runs in one process with no Ray (``LocalRuntime``); the Ray Train adapter calls the same
``fit`` on every worker with a ``RayRuntime`` (pipeline/ray_adapter.py). Nothing here imports Ray or
``torch.distributed``: the runtime provides rank, device, collectives and checkpoint storage.

``flow.advance(step)`` runs before every step's forward on every rank (it freezes EIW/LCMA
permutations at their configured steps and re-attaches LCMA's measurement after a resume).
Order of a fresh start: build the flow, initialise ActNorm on rank 0's first batch, then let the
runtime wrap it (DDP's constructor broadcasts rank 0's parameters and buffers to every replica).
After the last step rank 0 logs the final artifacts and the model, then the final checkpoint reports
the model version, so ``fit`` and the Ray adapter return the same ``FitResult``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flows import initialize_actnorm
from pipeline.checkpoint import checkpoint_name
from pipeline.config import TrainConfig, checkpoint_root
from pipeline.config_loading import flatten
from pipeline.console import Console
from pipeline.data import make_eval_loader, make_train_loader, train_batches
from pipeline.device_settings import (
    DeviceSettings,
    FirstStepClock,
    apply_settings,
    choose_settings,
    compile_objective,
)
from pipeline.evaluation import evaluate_iwbo, seeded_noise
from pipeline.faults import NO_FAULTS, Faults
from pipeline.final_artifacts import (
    FINAL_STEP_TAG,
    MODEL_VERSION_TAG,
    log_final_artifacts,
    require_finite_score,
)
from pipeline.lineage import GIT_COMMITS_TAG, code_tags, code_version, shard_datasets
from pipeline.metric_window import MetricWindow
from pipeline.runtime import LocalRuntime, Runtime
from pipeline.sampling import grid_images, sample_grids
from pipeline.step import StepResult, TrainingObjective, evaluate, train_step
from pipeline.tracking import Tracker
from pipeline.train_state import NonFiniteLossError, TrainState

__all__ = ["FINAL_STEP_TAG", "MODEL_VERSION_TAG", "FitResult", "NonFiniteLossError", "Trainer", "fit"]

log = logging.getLogger(__name__)

DIAGNOSTICS_PREFIX = "diag/"
MEMORY_PREFIX = "memory/"
REBUILD_ERROR_WARNING = 1e-2  # docs/model.md, "Memory modes": above it, use memory: checkpoint


@dataclass(kw_only=True)
class FitResult:
    """Where a run stands: what ``fit`` returns, and what each checkpoint reports to Ray Train/Tune.

    ``diagnostics``: the split strategies' ``flow.split_diagnostics()`` (``split0/churn`` ...).
    """

    step: int
    test_bits_per_dim: float
    mlflow_run_id: str | None
    model_version: str | None
    images_per_s: float
    skipped_steps: int
    diagnostics: dict[str, float]
    checkpoint_path: str | None = None

    def as_report(self) -> dict[str, Any]:
        """Flat metrics for ``ray.train.report`` (Tune's ASHA reads ``step`` and ``test_bits_per_dim``)."""
        return {
            "step": self.step,
            "test_bits_per_dim": self.test_bits_per_dim,
            "mlflow_run_id": self.mlflow_run_id or "",
            "model_version": self.model_version or "",
            "images_per_s": self.images_per_s,
            "skipped_steps": self.skipped_steps,
            **{f"{DIAGNOSTICS_PREFIX}{k}": v for k, v in self.diagnostics.items()},
        }

    @classmethod
    def from_report(cls, metrics: dict[str, Any], *, checkpoint_path: str | None) -> FitResult:
        return cls(
            step=int(metrics.get("step", 0)),
            test_bits_per_dim=float(metrics.get("test_bits_per_dim", math.nan)),
            mlflow_run_id=metrics.get("mlflow_run_id") or None,
            model_version=metrics.get("model_version") or None,
            images_per_s=float(metrics.get("images_per_s", math.nan)),
            skipped_steps=int(metrics.get("skipped_steps", 0)),
            diagnostics={
                k.removeprefix(DIAGNOSTICS_PREFIX): float(v)
                for k, v in metrics.items()
                if k.startswith(DIAGNOSTICS_PREFIX)
            },
            checkpoint_path=checkpoint_path,
        )


# ----------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, *, runtime: Runtime | None = None, faults: Faults = NO_FAULTS) -> FitResult:
    """Train ``cfg`` to ``cfg.total_steps``, resuming from the runtime's latest checkpoint.

    The shards must exist (``pipeline.data.ensure_data``, run once by the driver). ``faults``: tests only.
    """
    if runtime is None:
        runtime = LocalRuntime(
            checkpoint_root(cfg) / cfg.run.name,
            num_to_keep=cfg.run.keep_checkpoints,
            background=cfg.run.async_checkpoints,
        )
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    torch.manual_seed(cfg.run.seed * 1000 + runtime.rank)
    random.seed(cfg.run.seed * 1000 + runtime.rank)

    settings = choose_settings(runtime.device.type, cfg)
    apply_settings(settings)
    state = TrainState(cfg, runtime.device, settings=settings)
    state.resume(runtime)
    state.flow.advance(state.step)
    loader = make_train_loader(
        cfg.data, seed=cfg.run.seed, pin_memory=settings.pin_memory, micro_batches=cfg.optim.accumulate
    )
    if state.resumed_from is None and runtime.is_main:
        loader.set_epoch(0)
        initialize_actnorm(state.flow, next(iter(loader)).to(runtime.device))
    trainer = Trainer(
        cfg=cfg,
        runtime=runtime,
        state=state,
        objective=compile_objective(runtime.wrap(TrainingObjective(state.flow)), settings),
        settings=settings,
        tracker=start_tracking(cfg, runtime, state),
        console=Console(cfg, runtime, initial=state.step),
        window=MetricWindow(
            images_per_step=cfg.data.batch_size * runtime.world_size * cfg.optim.accumulate,
            first_window_steps=cfg.run.log_every,
            workers=runtime.world_size,
        ),
        faults=faults,
    )
    state.start_ema()  # after ActNorm's initialisation and the DDP broadcast: the same on every rank
    if runtime.is_main:
        trainer.console.say(f"device settings, {settings.describe()}")
    total, per_epoch, first_step = cfg.total_steps, cfg.data.batches_per_epoch, state.step
    status, version = "FAILED", None
    try:
        for batch in train_batches(loader, start=state.step, total=total, per_epoch=per_epoch):
            trainer.train_step(batch)
            step = state.step
            if trainer.should_log(step):
                trainer.log_window()
            if trainer.should_eval(step):
                trainer.evaluate_and_sample()
            if trainer.should_checkpoint(step):
                trainer.save_checkpoint(state.snapshot(runtime))

        snapshot = state.snapshot(runtime)  # collective, so taken on every rank
        version = log_final_artifacts(cfg, runtime, state, trainer.tracker, trainer.console, snapshot)
        if state.step > first_step:  # the final checkpoint carries the model version to Ray
            trainer.save_checkpoint(snapshot, version=version)
        else:
            # Resumed at the final step: the final checkpoint was written, but its report may never
            # have reached the driver (a Tune search cut off just then). Report the result again,
            # without a checkpoint, so the driver (Tune: the trial's row, its MLflow run) sees it.
            runtime.report(trainer.result(version=version).as_report())
        runtime.flush_checkpoints()  # written in the background: finished only once it is complete
        status = "FINISHED"
    except BaseException as e:
        trainer.tracker.set_tags({"pipeline.failure": f"{type(e).__name__}: {e}"[:5000]})
        try:  # complete the last checkpoint taken, so that a resume starts from it
            runtime.flush_checkpoints()
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            log.exception("the last checkpoint could not be written either")
        raise
    finally:
        trainer.console.close()
        trainer.tracker.end(status)
    return trainer.result(version=version)


# ------------------------------------------------------------------------------------- Trainer
@dataclass(kw_only=True)
class Trainer:
    """The collaborators of one run, held once, and the cadence that ``fit`` reads top to bottom.

    Each ``should_*`` names one "when" (a function of the step alone, so every rank decides alike).
    Extending the loop: a per-step transform (compile, gradient accumulation, an EMA update) goes
    into ``train_step``; state a restart must carry goes into ``TrainState.snapshot`` and ``resume``
    (pipeline/train_state.py, ``RESUME_KEYS`` in pipeline/checkpoint.py).
    """

    cfg: TrainConfig
    runtime: Runtime
    state: TrainState
    objective: nn.Module  # the flow's TrainingObjective, wrapped by the runtime (DDP under Ray)
    tracker: Tracker
    console: Console
    window: MetricWindow
    settings: DeviceSettings | None = None
    faults: Faults = NO_FAULTS

    def __post_init__(self) -> None:
        self.first_step_clock = FirstStepClock(compiled=bool(self.settings and self.settings.compile))

    # --------------------------------------------------------------------------------- cadence
    def should_log(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.cfg.total_steps

    def should_eval(self, step: int) -> bool:
        """After every ``run.eval_every_epochs``-th epoch, and after the last step."""
        per_epoch = self.cfg.data.batches_per_epoch
        at_epoch_end = step % per_epoch == 0 and (step // per_epoch) % self.cfg.run.eval_every_epochs == 0
        return at_epoch_end or step == self.cfg.total_steps

    def should_checkpoint(self, step: int) -> bool:
        """Every ``run.checkpoint_every`` steps; the final one is ``fit``'s, after the final artifacts."""
        return step % self.cfg.run.checkpoint_every == 0 and step < self.cfg.total_steps

    # ------------------------------------------------------------------------------------ work
    def train_step(self, batch: Tensor) -> StepResult:
        """One optimizer step on a uint8 batch (B, C, H, W), counted and added to the metric window."""
        state, runtime = self.state, self.runtime
        self.faults.before_step(state.step + 1, runtime)
        state.flow.advance(state.step)
        batch = batch.to(runtime.device, non_blocking=True)
        if self.settings is not None and self.settings.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        self.first_step_clock.start()
        result = train_step(
            self.objective,
            batch,
            state.optimizer,
            state.scheduler,
            cfg=self.cfg,
            runtime=runtime,
            poison=self.faults.poisons(state.step + 1),
        )
        if self.first_step_clock.pending:
            result.skipped.item()  # wait for the device once, so the first step's time is its own
            seconds = self.first_step_clock.stop(self.console.say if runtime.is_main else lambda _: None)
            self.tracker.log_metrics(state.step + 1, {"train/first_step_s": seconds})
        if state.ema is not None:
            state.ema.update(state.flow, result.skipped)
        state.count(result)
        self.window.add(result)
        self.console.advance()
        return result

    def log_window(self) -> None:
        """Close the metric window: its means (and, on rank 0, the split diagnostics) to MLflow now, the
        split order to the order picture's history, a log line."""
        state, console = self.state, self.console
        state.settle(checkpoint_dir=self.runtime.run_dir)  # the step's one host read: skips, lr
        lr = state.scheduler.get_last_lr()[0]
        metrics, text = self.window.close(state.step, lr=lr, skipped_total=state.skipped_steps)
        if self.runtime.is_main:
            metrics |= {f"{DIAGNOSTICS_PREFIX}{k}": v for k, v in state.flow.split_diagnostics().items()}
            # Invertible memory's drift (docs/model.md, "Memory modes"); empty in the other modes.
            memory = state.flow.memory_diagnostics()
            metrics |= {f"{MEMORY_PREFIX}{k}": v for k, v in memory.items()}
            worst = max(memory.values(), default=0.0)
            if worst > REBUILD_ERROR_WARNING:
                console.say(
                    f"step {state.step}: invertible memory rebuilt a level input {worst:.2e} off (above "
                    f"{REBUILD_ERROR_WARNING:g}); gradients drift: consider model.memory=checkpoint"
                )
            self.tracker.record_order(state.step, state.flow.kept_shares())
        self.tracker.log_metrics(state.step, metrics)
        console.say(f"step {state.step}/{self.cfg.total_steps} | {text}")

    def evaluate_and_sample(self) -> None:
        """Exact test bits/dim over the whole test split (every rank takes part) into
        ``state.test_bits_per_dim``; rank 0 then logs sample grids as stepped images (the UI's slider),
        except after the last step, whose grids come with the final artifacts."""
        cfg, runtime, state, tracker, console = self.cfg, self.runtime, self.state, self.tracker, self.console
        test_loader = make_eval_loader(cfg.data, rank=runtime.rank, world_size=runtime.world_size)
        with seeded_noise(cfg.run.seed * 1_000_003 + runtime.rank, runtime.device):  # DenseFlow's, q(u|x)'s
            bpd, count = evaluate(state.flow, test_loader, runtime=runtime, seed=cfg.run.seed)
        tracker.log_metrics(state.step, {"test/bits_per_dim": bpd})
        console.say(f"step {state.step}/{cfg.total_steps} | test bits/dim {bpd:.4f} over {count} images")
        require_finite_score(bpd, state.step)  # a broken model stops here, before sampling or registering
        if state.ema is not None:  # the averaged weights on the same images and noise
            with seeded_noise(cfg.run.seed * 1_000_003 + runtime.rank, runtime.device):
                ema_loader = make_eval_loader(cfg.data, rank=runtime.rank, world_size=runtime.world_size)
                ema_bpd, _ = evaluate(state.ema.ready(), ema_loader, runtime=runtime, seed=cfg.run.seed)
            state.test_bits_per_dim_ema = ema_bpd
            tracker.log_metrics(state.step, {"test/bits_per_dim_ema": ema_bpd})
            console.say(f"step {state.step}/{cfg.total_steps} | test bits/dim (EMA weights) {ema_bpd:.4f}")
        if cfg.run.iwbo_samples and state.step == cfg.total_steps:
            k = cfg.run.iwbo_samples
            iwbo, _ = evaluate_iwbo(
                state.flow,
                make_eval_loader(cfg.data, rank=runtime.rank, world_size=runtime.world_size),
                runtime=runtime,
                seed=cfg.run.seed,
                num_samples=k,
                chunk_size=cfg.run.iwbo_chunk or cfg.data.eval_batch_size,
            )
            tracker.log_metrics(state.step, {"test/iwbo_bits_per_dim": iwbo})
            console.say(f"step {state.step}/{cfg.total_steps} | test IWBO bits/dim (K = {k}) {iwbo:.4f}")
        if runtime.is_main and state.step != cfg.total_steps:
            grids = sample_grids(
                state.flow, cfg.run.sample_temperatures, num=cfg.run.num_samples, seed=cfg.run.seed
            )
            tracker.log_images(state.step, grid_images(grids))
        state.test_bits_per_dim = bpd
        self.window.restart_clock()

    def save_checkpoint(self, snapshot: dict, *, version: str | None = None) -> None:
        """Collective. Returns once the checkpoint is durable. Rank 0 then waits for the metrics queued so
        far and rewrites the order history artifact, which a restart from this checkpoint reads back."""
        self.state.save(self.runtime, snapshot, metrics=self.result(version=version).as_report())
        self.tracker.wait()
        self.tracker.save_order()
        self.window.restart_clock()

    def result(self, *, version: str | None = None) -> FitResult:
        state = self.state
        return FitResult(
            step=state.step,
            test_bits_per_dim=state.test_bits_per_dim,
            mlflow_run_id=self.tracker.run_id,
            model_version=version,
            images_per_s=self.window.images_per_s,
            skipped_steps=state.skipped_steps,
            diagnostics=state.flow.split_diagnostics(),
            checkpoint_path=str(self.runtime.run_dir / checkpoint_name(state.step)),
        )


def start_tracking(cfg: TrainConfig, runtime: Runtime, state: TrainState) -> Tracker:
    """Open (rank 0) or reopen the run's MLflow run, its id going into every checkpoint; record the
    code (git commit, dirty flag, image) and the train and test shards (dataset inputs) it uses."""
    tracker = Tracker(cfg.mlflow, active=runtime.is_main, run_root=cfg.run.root)
    tags = {"pipeline.world_size": str(runtime.world_size), "pipeline.device": runtime.device.type}
    if state.resumed_from is not None:
        tags["pipeline.resumed_from_step"] = str(state.resumed_from)
    tags |= state.resume_tags  # an unreadable checkpoint passed over, settings changed on resume
    tracker.start(
        run_id=state.mlflow_run_id,
        run_name=cfg.run.name,
        params=flatten(cfg.model_dump(mode="json")),
        tags=tags,
        resumed_from=state.resumed_from,
    )
    if cfg.mlflow.system_metrics and runtime.world_size > 1:  # every node logs its own system metrics
        tracker.follow_node_metrics(runtime.all_gather_object(tracker.run_id)[0])
    if runtime.is_main:
        state.mlflow_run_id = tracker.run_id
        tracker.set_tags(code_tags(code_version(), previous_commits=tracker.get_tag(GIT_COMMITS_TAG)))
        tracker.log_datasets(shard_datasets(cfg.data.root))
    return tracker
