"""One Tune trial = one Ray Train run of the pipeline (the Train V2 driver pattern).

Tune runs ``run_trial`` as a function trainable; it builds the trial's ``TrainConfig`` once (the
search's base config + the sampled values) and calls ``pipeline.ray_adapter.fit_with_ray``, which builds and
fits a ``TorchTrainer`` named ``train-trial_id=<id>`` (no timestamp, so a resumed search finds the
trial's Ray Train checkpoints under ``<experiment>/checkpoints/`` and continues from the latest one).
``TuneReportCallback`` forwards what rank 0 reports with each checkpoint (``step``,
``test_bits_per_dim``, ``mlflow_run_id``, ...) to Tune, where ASHA reads it.

The trial's MLflow run is nested under the search's parent run (``mlflow.parent_run_id``); it logs
its model when it completes, and the search registers only the best one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import TrainConfig
from pipeline.config_loading import revise


def train_run_name(trial_id: str) -> str:
    """Ray Train run (and MLflow run) name of a trial."""
    return f"train-trial_id={trial_id}"


def trial_config(base: TrainConfig, values: Mapping[str, Any], trial_id: str) -> TrainConfig:
    """``base`` (resolved, with the search's run.root and MLflow settings) + sampled ``values``.

    Checkpoints are reported synchronously (``run.async_checkpoints: false``): ASHA decides at each
    report, and with asynchronous uploads the report arrives after the workers have trained on past
    the rung (a trial it stops would already have finished and logged its model)."""
    return revise(base, {**values, "run.name": train_run_name(trial_id), "run.async_checkpoints": False})


def run_trial(config: dict[str, Any], *, base: TrainConfig) -> None:
    """The Tune trainable: ``config`` maps dotted TrainConfig keys to this trial's values. The typed
    config built here is the one every Ray Train worker receives."""
    from pipeline.ray_adapter import fit_with_ray

    trial_id = ray.tune.get_context().get_trial_id()
    fit_with_ray(trial_config(base, config, trial_id), callbacks=[TuneReportCallback()])
