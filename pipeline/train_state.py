"""What a run carries from step to step, and from a checkpoint to its restart: the flow, optimizer,
learning-rate schedule, step counters, the MLflow run id and the last test bits/dim.

``TrainState(cfg, device)`` builds it fresh; ``resume`` loads the runtime's latest checkpoint into it;
``snapshot`` and ``save`` write it (pipeline/checkpoint.py holds the file format). Both are collective
under Ray: every rank calls them (the per-rank RNG states are gathered).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from flows import build_flow
from pipeline.checkpoint import checkpoint_name, read_checkpoint, rng_state, set_rng_state, write_checkpoint
from pipeline.config import TrainConfig, config_to_yaml
from pipeline.runtime import Runtime
from pipeline.step import StepResult, lr_factor, make_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for ``run.max_nonfinite_in_row`` steps in a row."""


class TrainState:
    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.flow = build_flow(cfg.model).to(device)
        self.optimizer = make_optimizer(self.flow.parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.step = 0  # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        self.mlflow_run_id: str | None = None
        self.test_bits_per_dim = math.nan
        self.resumed_from: int | None = None  # the checkpoint's step, when this process resumed one

    def resume(self, runtime: Runtime) -> None:
        """Load the runtime's latest checkpoint, if there is one."""
        with runtime.latest_checkpoint() as directory:
            saved = read_checkpoint(directory, map_location=self.device) if directory is not None else None
        if saved is None:
            return
        self.flow.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = self.resumed_from = saved["step"]
        self.skipped_steps = saved["skipped_steps"]
        self.mlflow_run_id, self.test_bits_per_dim = saved["mlflow_run_id"], saved["test_bits_per_dim"]
        if len(saved["rng"]) == runtime.world_size:  # else a different world size: fresh RNG streams
            set_rng_state(saved["rng"][runtime.rank], self.device)
        log.info("rank %d: resumed from %s at step %d", runtime.rank, directory, self.step)

    def count(self, result: StepResult, *, checkpoint_dir: Path) -> None:
        """One more step done; NonFiniteLossError after ``run.max_nonfinite_in_row`` skipped in a row."""
        self.step += 1
        if not result.skipped:
            self.nonfinite_in_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        if self.nonfinite_in_row >= self.cfg.run.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"loss or gradient non-finite for {self.nonfinite_in_row} steps in a row (step {self.step}); "
                f"stopping. The last good checkpoint is intact in {checkpoint_dir}; lower optim.lr, raise "
                "optim.warmup_steps or check the data, then re-run to resume."
            )

    def snapshot(self, runtime: Runtime) -> dict:
        """Everything a restart needs, as plain containers of tensors and numbers. Collective."""
        rngs = runtime.all_gather_object(rng_state(self.device))
        return {
            "step": self.step,
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "config": self.cfg.model_dump(mode="json"),
            "mlflow_run_id": self.mlflow_run_id,
            "skipped_steps": self.skipped_steps,
            "test_bits_per_dim": self.test_bits_per_dim,
        }

    def save(self, runtime: Runtime, snapshot: dict, *, metrics: dict) -> None:
        """Collective: rank 0 writes ``snapshot``; returns once it is the checkpoint a restart sees."""

        def write(directory: Path) -> None:
            write_checkpoint(directory, snapshot, config_to_yaml(self.cfg))

        runtime.save_checkpoint(
            write if runtime.is_main else None, name=checkpoint_name(self.step), metrics=metrics
        )
