"""Log the trained flow as an MLflow model, register it, move the aliases, and load it back.

The model is weights as tensors plus the flow config, never a pickle (pipeline/flow_pyfunc.py):
``log_flow_model`` logs a pyfunc built from code (``mlflow.pyfunc.log_model(python_model=<file>)``)
whose artifacts are ``weights.pt`` (a ``state_dict`` read with ``torch.load(weights_only=True)``)
and ``flow_config.json``. ``mlflow models serve -m models:/<name>@champion --env-manager local``
scores uint8 images in bits/dim; ``load_flow_model`` rebuilds the ``flows.FlowModel`` from code.
The model carries its code (``code/``: the ``flows``, ``pipeline`` and ``data_prep`` packages) and
exact pip requirements (torch, mlflow, numpy, pydantic), so it loads and serves from any Python
that has those, without this project installed.

``load_flow_model`` reads only those two files and the MLmodel YAML (safe loader): it never runs the
model's code file, never adds its ``code`` folder to ``sys.path``. ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` do run the model's code file (models-from-code), a three-line import of
``pipeline.flow_pyfunc`` from the model's own ``code/`` folder: serve only from a registry you trust.

Models logged before this format are ``mlflow.pytorch`` pickles. Unpickling runs whatever code the
file names, so ``load_flow_model`` refuses them unless called with ``allow_pickle=True``.

Aliases (MLflow's replacement for stages): ``newest_alias`` follows every new version;
``champion_alias`` moves only when the new version's test bits/dim (model-version tag
``test_bits_per_dim``) is lower than the current champion's.
"""

from __future__ import annotations

import importlib
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from flows import FlowModel
from pipeline.flow_pyfunc import (
    CONFIG_ARTIFACT,
    FORMAT,
    FORMAT_KEY,
    MAX_WORK,
    MODEL_CODE_PATH,
    WEIGHTS_ARTIFACT,
    input_example_for,
    read_flow_files,
    signature_for,
    write_flow_files,
)

if TYPE_CHECKING:
    from pipeline.config import MlflowConfig

log = logging.getLogger(__name__)

BPD_TAG = "test_bits_per_dim"
MODEL_NAME = "model"


# The packages the model's code file imports, shipped with the model as MLflow ``code_paths`` (the
# model's ``code/`` folder, put first on ``sys.path`` when it loads): ``pipeline.flow_pyfunc`` needs
# ``flows``, ``pipeline.config`` and ``data_prep.storage``, whose third-party imports are torch, numpy,
# MLflow and pydantic (an MLflow dependency) only. So the model loads in any Python with the
# requirements below, without this project installed (tests/integration/test_model_serving.py).
CODE_PACKAGES = ("flows", "pipeline", "data_prep")


def _code_paths() -> list[str]:
    return [str(Path(importlib.import_module(name).__file__).parent) for name in CODE_PACKAGES]


def _requirements() -> list[str]:
    # Explicit and exact, so MLflow does not spend a subprocess inferring them and a virtualenv
    # MLflow builds from them (``mlflow models serve`` without ``--env-manager local``,
    # ``mlflow models build-docker``) runs the versions the model was trained and tested with. This
    # project itself is not a requirement: its code travels in the model (``_code_paths``).
    import pydantic

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
        f"pydantic=={pydantic.VERSION}",
    ]


def _model_kwargs(
    model: FlowModel, files: dict[str, str], test_bpd: float | None, lineage: dict | None = None
) -> dict:
    metadata = {
        **(lineage or {}),  # the run's config, code and datasets (pipeline/lineage.py)
        FORMAT_KEY: FORMAT,
        "image_shape": list(model.cfg.image_shape),
        "split_strategy": model.cfg.split.strategy,
    }
    if test_bpd is not None:
        metadata["test_bits_per_dim"] = float(test_bpd)
    return {
        "python_model": str(MODEL_CODE_PATH),
        "artifacts": files,
        "signature": signature_for(model.cfg),
        "input_example": input_example_for(model.cfg),
        "pip_requirements": _requirements(),
        "code_paths": _code_paths(),
        "metadata": metadata,
        # Declared so that it can be overridden at load time (MLflow drops keys not logged here):
        # ``load_model(..., model_config={"device": "cuda"})`` or, for ``mlflow models serve``, the
        # environment variable MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'.
        "model_config": {"device": "cpu", "max_work": MAX_WORK},
    }


def log_flow_model(model: FlowModel, *, test_bpd: float, lineage: dict | None = None) -> str:
    """Log ``model`` (weights as CPU float32 tensors plus its config) to the active run as a pyfunc
    built from code; returns the model URI. ``lineage``: more MLmodel metadata (plain YAML values:
    ``pipeline.lineage.model_metadata``, the resolved training config, code version and datasets)."""
    with tempfile.TemporaryDirectory(prefix="eiw-model-") as tmp:
        files = write_flow_files(model, tmp)
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, **_model_kwargs(model, files, test_bpd, lineage))
    return info.model_uri


def save_flow_model(model: FlowModel, path: str | Path, *, test_bpd: float | None = None) -> Path:
    """``log_flow_model`` into a local directory (no run, no server); ``path`` must not exist yet."""
    with tempfile.TemporaryDirectory(prefix="eiw-model-") as tmp:
        files = write_flow_files(model, tmp)
        mlflow.pyfunc.save_model(path=str(path), **_model_kwargs(model, files, test_bpd))
    return Path(path)


def _champion_bpd(client: MlflowClient, name: str, alias: str) -> float | None:
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = current.tags.get(BPD_TAG)
    return float(value) if value is not None else None


def register(model_uri: str, *, cfg: MlflowConfig, test_bpd: float, run_id: str) -> ModelVersion:
    """Register ``model_uri`` under ``cfg.registered_model``; set the newest alias, maybe the champion."""
    if not math.isfinite(test_bpd):  # a broken model never becomes a version nor moves an alias
        raise ValueError(f"refusing to register {model_uri}: its test bits/dim is {test_bpd} (non-finite)")
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


def _artifact_file(root: Path, mlmodel: Model, name: str, uri: str) -> Path:
    """The local path of pyfunc artifact ``name``, which must be a file inside the model directory."""
    try:
        relative = mlmodel.flavors["python_function"]["artifacts"][name]["path"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{uri}: the model lists no {name!r} artifact") from e
    path = (root / str(relative)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise ValueError(f"{uri}: artifact {name!r} ({relative}) is not a file inside the model")
    return path


def _load_pickled(local: Path, uri: str, map_location: str | torch.device, allow_pickle: bool) -> FlowModel:
    if not allow_pickle:
        raise ValueError(
            f"{uri}: refusing to load a pickled mlflow.pytorch model (logged before weights-only models): "
            "unpickling runs any code the file names. If you trust whoever could write this model, "
            "pass allow_pickle=True, then re-log it with log_flow_model to convert it"
        )
    log.warning("%s: unpickling a pickled model (allow_pickle=True): this runs code from the file", uri)
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(str(local), map_location=map_location, weights_only=False)
    if not isinstance(model, FlowModel):
        raise ValueError(f"{uri}: expected a flows.FlowModel, got {type(model).__name__}")
    return model.eval()


def _storage_uri(uri: str, tracking_uri: str | None) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> where that version's files are,
    resolved through ``tracking_uri``'s registry. MLflow 3.17's ``download_artifacts`` resolves
    ``models:/`` URIs through the *global* registry URI whatever its ``registry_uri`` argument says, and
    setting the global would leak into the caller's process (and its environment variables)."""
    if tracking_uri is None or not uri.startswith("models:/"):
        return uri
    name, sep, alias = uri.removeprefix("models:/").partition("@")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if sep:
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = name.rpartition("/")
        if not name or not version.isdigit():
            return uri  # a logged model id (models:/m-...): resolved through the tracking URI
    return client.get_model_version_download_uri(name, version)


def load_flow_model(
    uri: str,
    *,
    tracking_uri: str | None = None,
    map_location: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> FlowModel:
    """``models:/<name>@<alias>`` (or any model URI or local model directory) -> the ``FlowModel``,
    rebuilt from its config and weights (``torch.load(weights_only=True)``), on ``map_location``, in
    eval mode.

    Runs nothing from the model: not its code file, not a pickle. A file that is not plain tensors
    raises ``pipeline.flow_pyfunc.UnsafeModelFileError`` (a ``ValueError``). Older pickled
    ``mlflow.pytorch`` models raise ``ValueError`` unless ``allow_pickle=True``, which unpickles
    them and so runs whatever code the file names: only for a registry whose writers you trust.
    ``tracking_uri`` (also used as the registry URI) defaults to MLflow's configured one.
    """
    with tempfile.TemporaryDirectory(prefix="eiw-load-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=_storage_uri(uri, tracking_uri),
                dst_path=tmp,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
        mlmodel = Model.load(str(local))  # the MLmodel YAML, read with yaml.safe_load
        written_as = (mlmodel.metadata or {}).get(FORMAT_KEY)
        if written_as == FORMAT:
            weights = _artifact_file(local, mlmodel, WEIGHTS_ARTIFACT, uri)
            config = _artifact_file(local, mlmodel, CONFIG_ARTIFACT, uri)
            return read_flow_files(weights, config, map_location=map_location)
        if written_as is not None:
            raise ValueError(f"{uri}: model format {written_as!r}; this version reads {FORMAT!r}")
        if "pytorch" in mlmodel.flavors:
            return _load_pickled(local, uri, map_location, allow_pickle)
        raise ValueError(f"{uri}: not an EIW-Flow model (no {FORMAT_KEY!r} in its MLmodel metadata)")
