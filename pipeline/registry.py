"""Log the trained flow as an MLflow model, register it, move the aliases, and load it back.

MLflow 3's ``mlflow.pytorch.log_model`` defaults to ``torch.export`` (pt2), whose reloaded graph
module has no ``sample`` or ``bits_per_dim``. We log with ``serialization_format="pickle"``: the
reloaded object is the ``flows.FlowModel`` itself. Its classes are pickled by reference to the
``flows`` package, which is shipped inside the model (``code_paths``), so loading needs only torch,
mlflow and that code. Pickle runs code on load: only load models from a registry you trust.

Aliases (MLflow's replacement for stages): ``newest_alias`` follows every new version;
``champion_alias`` moves only when the new version's test bits/dim (model-version tag
``test_bits_per_dim``) is lower than the current champion's.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import flows
from flows import FlowModel
from pipeline.config import MlflowConfig

log = logging.getLogger(__name__)

BPD_TAG = "test_bits_per_dim"
MODEL_NAME = "model"


def _requirements() -> list[str]:
    # Explicit, so MLflow does not spend a subprocess inferring them.
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def log_flow_model(model: FlowModel, *, test_bpd: float) -> str:
    """Log a CPU float32 copy of ``model`` to the active run; returns the model URI."""
    cpu = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    info = mlflow.pytorch.log_model(
        cpu,
        name=MODEL_NAME,
        serialization_format="pickle",
        code_paths=[str(Path(flows.__file__).parent)],
        pip_requirements=_requirements(),
        metadata={
            "test_bits_per_dim": test_bpd,
            "image_shape": list(model.cfg.image_shape),
            "split_strategy": model.cfg.split.strategy,
        },
    )
    return info.model_uri


def _champion_bpd(client: MlflowClient, name: str, alias: str) -> float | None:
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = current.tags.get(BPD_TAG)
    return float(value) if value is not None else None


def register(model_uri: str, *, cfg: MlflowConfig, test_bpd: float, run_id: str) -> ModelVersion:
    """Register ``model_uri`` under ``cfg.registered_model``; set the newest alias, maybe the champion."""
    client = MlflowClient(cfg.tracking_uri)
    version = mlflow.register_model(model_uri, cfg.registered_model, tags={BPD_TAG: repr(float(test_bpd))})
    name, number = cfg.registered_model, version.version
    client.set_registered_model_alias(name, cfg.newest_alias, number)
    best = _champion_bpd(client, name, cfg.champion_alias)
    if math.isfinite(test_bpd) and (best is None or test_bpd < best):
        client.set_registered_model_alias(name, cfg.champion_alias, number)
        client.set_model_version_tag(name, number, "champion_since_run", run_id)
        log.info(
            "%s v%s is the new %s (test %.4f bits/dim, previous %s)",
            name,
            number,
            cfg.champion_alias,
            test_bpd,
            "none" if best is None else f"{best:.4f}",
        )
    else:
        log.info(
            "%s v%s registered (test %.4f bits/dim); %s stays (%.4f)",
            name,
            number,
            test_bpd,
            cfg.champion_alias,
            best,
        )
    return client.get_model_version(name, number)


def load_flow_model(uri: str, *, tracking_uri: str | None = None, map_location: str = "cpu") -> FlowModel:
    """``models:/<name>@<alias>`` (or any model URI) -> the ``FlowModel``, in eval mode.

    ``weights_only=False``: the model is a pickled module (see the module docstring).
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(uri, map_location=map_location, weights_only=False)
    if not isinstance(model, FlowModel):
        raise ValueError(f"{uri}: expected a flows.FlowModel, got {type(model).__name__}")
    return model.eval()
