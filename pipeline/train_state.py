"""What a run carries from step to step, and from a checkpoint to its restart: the flow, optimizer,
learning-rate schedule, step counters, the MLflow run id and the last test bits/dim.

``TrainState(cfg, device)`` builds it fresh; ``resume`` loads the runtime's latest checkpoint into it;
``snapshot`` and ``save`` write it (pipeline/checkpoint.py holds the file format). All three are
collective under Ray: every rank calls them (the per-rank RNG states are gathered).

A resume takes the newest checkpoint that reads intact (an unreadable newer one is named in the log
and the ``pipeline.resume_fallback`` tag) and compares the config saved in it with the new one: the
architecture keys (``FIXED_ON_RESUME``) and ``optim.name`` must not change (ValueError listing each
differing key, old -> new); anything else may (a longer ``run.epochs``, another ``optim.lr``, batch
size, ``loss.sigma``, ``model.memory``, ``run.precision``), takes effect, and is logged with the
``pipeline.resume_changes`` tag. A checkpoint saved before a key moved (``MOVED_KEYS``:
``model.split.sigma`` -> ``loss.sigma``) is read with its keys moved.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from flows import FlowModel, build_flow
from flows.strategies import legacy_split_keys
from pipeline.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    read_newest_intact,
    write_checkpoint,
)
from pipeline.checkpoint_writer import cpu_copy
from pipeline.config import (
    DEFAULT_SPLIT_STRATEGY,
    TrainConfig,
    checkpoint_root,
    config_to_yaml,
    migrate_moved_keys,
)
from pipeline.config_loading import flatten
from pipeline.device_settings import DeviceSettings, optimizer_options
from pipeline.ema import WeightAverage
from pipeline.rng import rng_state, set_rng_state
from pipeline.runtime import Runtime
from pipeline.step import StepResult, lr_factor, make_optimizer

log = logging.getLogger(__name__)

RESUME_FALLBACK_TAG = "pipeline.resume_fallback"  # which checkpoints were unreadable, which one was used
RESUME_CHANGES_TAG = "pipeline.resume_changes"  # settings that differ from the checkpoint's, old -> new
# What a resume keeps from its checkpoint (dotted keys; one ending in "." is a whole section): the
# weights mean something only for the architecture they were trained with (parameter shapes, the split
# strategy and its buffers, the priors, the dequantizer, init_seed; n_bits: bits/dim at other n_bits is
# another quantity), and the optimizer's moments only for the optimizer that made them. Free to change:
# model.memory (how activations are kept for backward, flows/model.py), loss weights, lr, precision.
FIXED_ON_RESUME = (
    "model.image_shape",
    "model.num_levels",
    "model.num_steps",
    "model.hidden_channels",
    "model.coupling",
    "model.split_prior",
    "model.learn_top_prior",
    "model.n_bits",
    "model.init_seed",
    "model.base",
    "model.dequantization",
    "model.split.",
    "model.denseflow.",
    "model.dequantizer.",
    "optim.name",
)
# The model keys a resume may change; with FIXED_ON_RESUME they cover every model key (a unit test checks).
FREE_ON_RESUME = ("model.memory",)


def is_fixed_on_resume(key: str) -> bool:
    """Whether the dotted ``key`` (``model.split.strategy``) must stay."""
    return any(key.startswith(f) if f.endswith(".") else key == f for f in FIXED_ON_RESUME)


def saved_in_current_keys(saved: dict) -> dict:
    """A checkpoint's saved config in today's key names: moved keys (``model.split.sigma`` ->
    ``loss.sigma``) and the old flat split knobs (``lcma_warmup_steps`` -> LCMA's ``warmup_steps``)."""
    data = migrate_moved_keys(saved, warn=False)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("split"), dict):
        model["split"] = legacy_split_keys({"strategy": DEFAULT_SPLIT_STRATEGY, **model["split"]})
    return data


def config_changes(saved: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (the checkpoint's value, ``cfg``'s) for every setting that differs.

    A key the saved config lacks (added to the config since) counts as its default; one only the saved
    config has (since removed) is not compared.
    """
    new = flatten(cfg.model_dump(mode="json"))
    old = flatten(TrainConfig().model_dump(mode="json")) | flatten(saved_in_current_keys(saved))
    return {k: (old.get(k), v) for k, v in new.items() if k not in old or old[k] != v}


def check_resume_config(saved: dict, cfg: TrainConfig, *, source: str | Path) -> list[str]:
    """ValueError listing each differing key (old -> new) when a ``FIXED_ON_RESUME`` setting differs;
    else the other differences, as ``key: old -> new`` lines."""
    changes = [
        (k, f"{k}: {json.dumps(old)} -> {json.dumps(new)}")
        for k, (old, new) in config_changes(saved, cfg).items()
    ]
    fixed = [text for k, text in changes if is_fixed_on_resume(k)]
    if fixed:
        raise ValueError(
            f"run.name={cfg.run.name} cannot resume from {source}: a resume keeps the architecture and "
            f"optim.name its checkpoint was trained with, and these differ: {', '.join(fixed)}. Put the old "
            "values back to continue the run, or train the new settings under another run.name"
        )
    return [text for _, text in changes]


def check_resume(cfg: TrainConfig) -> None:
    """For a driver, before any worker starts: the ValueError ``TrainState.resume`` would raise for the
    run's newest intact checkpoint (a changed model, or no intact checkpoint), as one error, which a
    worker's would not be (Ray Train retries failed workers first). Reads the tensors lazily (mmap)."""
    candidates = list_checkpoints(checkpoint_root(cfg) / cfg.run.name)[::-1]
    found = read_newest_intact(candidates, mmap=True)
    if found is not None:
        check_resume_config(found.state["config"], cfg, source=found.directory)


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for ``run.max_nonfinite_in_row`` steps in a row."""


class TrainState:
    def __init__(
        self, cfg: TrainConfig, device: torch.device, *, settings: DeviceSettings | None = None
    ) -> None:
        self.cfg, self.device = cfg, device
        self.flow = build_flow(cfg.model).to(device)
        if settings is not None and settings.channels_last:
            self.flow.to(memory_format=torch.channels_last)
        options = optimizer_options(settings, cfg.optim.name) if settings is not None else {}
        self.optimizer = make_optimizer(self.flow.parameters(), cfg, **options)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.step = 0  # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        # device counters since the last ``settle``: skips, the current and the longest run of them
        self._skips: torch.Tensor | None = None
        self._in_row: torch.Tensor | None = None
        self._worst_in_row: torch.Tensor | None = None
        self.mlflow_run_id: str | None = None
        self.test_bits_per_dim = math.nan
        self.test_bits_per_dim_ema = math.nan
        self.ema: WeightAverage | None = None  # optim.ema_decay: started by ``start_ema`` or a resume
        self.resumed_from: int | None = None  # the checkpoint's step, when this process resumed one
        self.resume_tags: dict[str, str] = {}  # for MLflow: a fallback, changed settings

    def resume(self, runtime: Runtime) -> None:
        """Load the runtime's newest intact checkpoint, if there is one (see the module doc). Collective."""
        with runtime.resume_candidates() as candidates:
            found = read_newest_intact(candidates, map_location=self.device)
        if found is None:
            return
        steps = runtime.all_gather_object(found.state["step"])
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"the ranks read checkpoints of different steps {steps}; is {runtime.run_dir} shared?"
            )
        changes = check_resume_config(found.state["config"], self.cfg, source=found.directory)
        saved, directory = found.state, found.directory
        self.flow.load_state_dict(saved["model"])
        if self.cfg.optim.ema_decay is not None and saved.get("ema") is not None:
            self.ema = WeightAverage(self.flow, self.cfg.optim.ema_decay)
            self.ema.load_state_dict(saved["ema"])  # else (EMA new on this resume) start_ema starts it
        self.test_bits_per_dim_ema = saved.get("test_bits_per_dim_ema", math.nan)
        self._load_optimizer(saved)
        self.step = self.resumed_from = saved["step"]
        self.skipped_steps = saved["skipped_steps"]
        self.mlflow_run_id, self.test_bits_per_dim = saved["mlflow_run_id"], saved["test_bits_per_dim"]
        if len(saved["rng"]) == runtime.world_size:  # else a different world size: fresh RNG streams
            set_rng_state(saved["rng"][runtime.rank], self.device)
        log.info("rank %d: resumed from %s at step %d", runtime.rank, directory, self.step)
        if found.unreadable:
            text = f"{'; '.join(found.unreadable)}; resumed from {directory.name} (step {self.step}) instead"
            log.warning("rank %d: %s", runtime.rank, text)
            self.resume_tags[RESUME_FALLBACK_TAG] = text[:5000]
        if changes:
            if runtime.is_main:
                log.warning("resuming with changed settings (checkpoint -> now): %s", ", ".join(changes))
            self.resume_tags[RESUME_CHANGES_TAG] = ", ".join(changes)[:5000]

    def _load_optimizer(self, saved: dict) -> None:
        """The checkpoint's optimizer moments and schedule position with this config's lr, betas and
        weight decay (state dicts carry their own; a resume that changed them must use the new ones)."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])  # keeps this config's lr_lambdas (functions)
        self.scheduler.base_lrs = base_lrs
        for group, settings in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(settings)
            # fused/capturable kernels keep the step counter with the parameter, the others on the host
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    where = p.device if on_device else torch.device("cpu")
                    state["step"] = state["step"].to(where, torch.float32)
        self._set_schedule_position(self.scheduler.last_epoch)

    def start_ema(self) -> None:
        """Start the weight average (``optim.ema_decay``) from the current weights, unless a resume
        loaded it. Call after ActNorm's initialisation and the DDP broadcast, on every rank."""
        if self.cfg.optim.ema_decay is not None and self.ema is None:
            self.ema = WeightAverage(self.flow, self.cfg.optim.ema_decay)

    def registered_flow(self) -> tuple[FlowModel, float]:
        """(the flow to log and register, its test bits/dim): ``mlflow.register_weights``."""
        if self.ema is not None and self.cfg.mlflow.register_weights in ("auto", "ema"):
            return self.ema.ready(), self.test_bits_per_dim_ema
        return self.flow, self.test_bits_per_dim

    def count(self, result: StepResult) -> None:
        """One more step done. Skips are counted on the device (no host read); ``settle`` reads them."""
        self.step += 1
        skipped = result.skipped.to(torch.int64)
        if self._skips is None:
            self._skips, self._in_row, self._worst_in_row = (torch.zeros_like(skipped) for _ in range(3))
            self._in_row += self.nonfinite_in_row
        self._skips += skipped
        self._in_row.add_(skipped).mul_(skipped)  # the run of skipped steps, 0 after an update
        torch.maximum(self._worst_in_row, self._in_row, out=self._worst_in_row)

    def settle(self, *, checkpoint_dir: Path) -> None:
        """Read the skip counters (one host synchronisation; log steps, checkpoints, the end): add the
        new skips to ``skipped_steps``, wind the schedule back by them (it counts updates, so a
        skipped step does not eat warm-up), and raise NonFiniteLossError once
        ``run.max_nonfinite_in_row`` steps in a row were skipped."""
        if self._skips is None:
            return
        new, in_row, worst = (
            int(v) for v in torch.stack([self._skips, self._in_row, self._worst_in_row]).tolist()
        )
        self._skips.zero_()
        self._worst_in_row.copy_(self._in_row)
        self.nonfinite_in_row = in_row
        if new:
            self.skipped_steps += new
            self._set_schedule_position(self.scheduler.last_epoch - new)
        if worst >= self.cfg.run.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"loss or gradient non-finite for {worst} steps in a row (by step {self.step}); "
                f"stopping. The last good checkpoint is intact in {checkpoint_dir}; lower optim.lr, raise "
                "optim.warmup_steps or check the data, then re-run to resume."
            )

    def _set_schedule_position(self, updates: int) -> None:
        """The learning-rate schedule at ``updates`` optimizer updates (this config's base lrs)."""
        self.scheduler.last_epoch = updates
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(updates)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # get_last_lr's

    def snapshot(self, runtime: Runtime) -> dict:
        """Everything a restart needs, as plain containers of tensors and numbers. Collective; settles
        the skip counters first (NonFiniteLossError then stops the run before the checkpoint)."""
        self.settle(checkpoint_dir=runtime.run_dir)
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
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "test_bits_per_dim_ema": self.test_bits_per_dim_ema,
        }

    def save(self, runtime: Runtime, snapshot: dict, *, metrics: dict) -> None:
        """Collective: rank 0 writes ``snapshot``. The copy is taken now; the write may finish in the
        background (``runtime.save_checkpoint``), after which it is the checkpoint a restart sees."""
        if runtime.is_main:
            snapshot = cpu_copy(snapshot)  # training changes the live tensors in place from the next step

        def write(directory: Path) -> None:
            write_checkpoint(directory, snapshot, config_to_yaml(self.cfg))

        runtime.save_checkpoint(
            write if runtime.is_main else None, name=checkpoint_name(self.step), metrics=metrics
        )
