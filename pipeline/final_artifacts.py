"""What rank 0 logs once per run, after the last step: the config, final samples, the order picture,
the checkpoint (``mlflow.log_checkpoint``), the model with its lineage, and its registration."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import checkpoint_name, write_checkpoint
from pipeline.config import TrainConfig, config_to_yaml
from pipeline.console import Console
from pipeline.lineage import code_version, model_metadata, shard_datasets
from pipeline.runtime import Runtime
from pipeline.sampling import grid_images, sample_grids, save_grids
from pipeline.tracking import Tracker
from pipeline.train_state import TrainState

MODEL_VERSION_TAG = "pipeline.model_version"
FINAL_STEP_TAG = "pipeline.final_step"  # the step whose model was logged: a re-run does not log it twice


def log_final_artifacts(
    cfg: TrainConfig, runtime: Runtime, state: TrainState, tracker: Tracker, console: Console, snapshot: dict
) -> str | None:
    """Rank 0, once per run: config, final samples (stepped images and files), the order picture,
    the checkpoint (``mlflow.log_checkpoint``), the model with its lineage, its registration.

    Returns the registered model version (None when not registering, and on other ranks). A run that
    already logged its final step (``FINAL_STEP_TAG``) logs nothing again.
    """
    from pipeline.registry import log_flow_model, register

    if not runtime.is_main:
        return None
    step = state.step
    if tracker.get_tag(FINAL_STEP_TAG) == str(step):
        version = tracker.get_tag(MODEL_VERSION_TAG)
        console.say(f"step {step}: the final model was logged before (version {version}); not again")
        return version
    with tempfile.TemporaryDirectory(prefix="eiw-final-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_to_yaml(cfg), encoding="utf-8")
        tracker.log_artifacts([config_path])
        grids = sample_grids(
            state.flow, cfg.run.sample_temperatures, num=cfg.run.num_samples, seed=cfg.run.seed
        )
        tracker.log_images(step, grid_images(grids))
        tracker.log_artifacts(save_grids(grids, Path(tmp) / "samples", step=step), "samples")
        tracker.log_order_picture(title=f"{cfg.run.name}: {cfg.model.split.strategy} split order")
        if should_log_checkpoint(cfg, snapshot):
            final = write_checkpoint(Path(tmp) / checkpoint_name(step), snapshot, config_to_yaml(cfg))
            tracker.log_large_artifacts([final], f"checkpoint/{final.name}")
    version = None
    require_finite_score(state.test_bits_per_dim, step)  # before any model is logged or registered
    if cfg.mlflow.log_model:
        lineage = model_metadata(cfg.model_dump(mode="json"), code_version(), shard_datasets(cfg.data.root))
        flow, test_bpd = state.registered_flow()  # raw or averaged weights: mlflow.register_weights
        require_finite_score(test_bpd, step)  # the averaged weights' score, when they are the ones logged
        model_uri = log_flow_model(flow, test_bpd=test_bpd, lineage=lineage)
        if cfg.mlflow.register:
            registered = register(model_uri, cfg=cfg.mlflow, test_bpd=test_bpd, run_id=tracker.run_id)
            version = str(registered.version)
            tracker.set_tags({MODEL_VERSION_TAG: version})
    tracker.set_tags({FINAL_STEP_TAG: str(step)})
    return version


def should_log_checkpoint(cfg: TrainConfig, snapshot: dict) -> bool:
    """``mlflow.log_checkpoint``, with ``auto``: only while weights + optimizer state fit in
    ``mlflow.log_checkpoint_max_mb`` (Ray Train's storage keeps every checkpoint regardless)."""
    if isinstance(cfg.mlflow.log_checkpoint, bool):
        return cfg.mlflow.log_checkpoint
    size = _tensor_bytes([snapshot["model"], snapshot["optimizer"]])
    return size <= cfg.mlflow.log_checkpoint_max_mb * 2**20


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def require_finite_score(test_bpd: float, step: int) -> None:
    """ValueError when the test score is NaN or infinite: such a model is broken (diverged, or its
    weights corrupted) and must never become a model version or move an alias."""
    if not math.isfinite(test_bpd):
        raise ValueError(
            f"step {step}: test bits/dim is {test_bpd} (non-finite): the model is broken (diverged, or "
            "resumed from damaged weights); training stopped and nothing was registered. Resume from an "
            "earlier checkpoint (move the newer checkpoint_* directories away) or lower optim.lr"
        )
