"""The registered model's files and its MLflow pyfunc: weights as tensors plus the config, no pickle.

A logged model holds two files, read back by ``read_flow_files`` (the only loader):

- ``weights.pt``: the ``state_dict`` (CPU, floating tensors as float32) written with ``torch.save``
  and read with ``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors,
  containers and numbers only: a file that names any other callable is refused before it runs.
- ``flow_config.json``: ``flows.FlowConfig`` as a plain dict (``dataclasses.asdict``), rebuilt with
  ``pipeline.config.flow_config_from_dict``, checked like an experiment's ``model`` section (an
  unknown key or bad value is an error naming it; a field a later ``SplitConfig`` added takes its
  default).

The ``FlowModel`` is rebuilt from this package's code (``flows.build_flow``), then
``load_state_dict(strict=True)``; ActNorm's ``initialized`` flags and the split strategies' held
permutations are buffers, so they come back with the weights.

``FlowPyfunc`` is the ``mlflow.pyfunc.PythonModel`` logged *from code* (``flow_pyfunc_model.py``,
three lines that import this module from the copy of this package shipped in the model's ``code/``
folder; nothing is cloudpickled). Input: a batch ``(N, C, H, W)`` of pixels, uint8 or integers in
0..255; floats and booleans are refused (400), never cast. The input is deliberately left out of the
signature: MLflow's scoring server casts a JSON body to the declared dtype
(``np.array(data, dtype=uint8)``), so 1.7 or ``true`` became 1 and was scored before the model saw it.
``predict`` checks dtype, range and shape itself, first.

Work is bounded up front: a bits/dim request costs N x num_samples flow passes and may cost at most
``max_work`` (``MAX_WORK``, 1024 by default; the model_config key ``max_work`` changes it at load
time), a 400 beyond. So no request can keep a core busy long after the server's timeout answered 504.
``params``:

- ``mode="bits_per_dim"`` (default): float64 ``(N,)``, ``model.bits_per_dim(x)`` with the
  dequantization noise drawn from ``torch.Generator().manual_seed(seed)`` (and every other noise, the
  variational dequantizer's and DenseFlow's, from the global RNG seeded with ``seed`` and restored),
  so a score is reproducible. ``num_samples`` K > 1 scores with the importance-weighted bound over K
  draws instead (``model.iwbo_bits_per_dim``, the trainer's ``test/iwbo_bits_per_dim``), tighter
  for models trained on a bound; K = 1 is the one-draw ELBO.
- ``mode="sample"``: uint8 ``(num, C, H, W)`` drawn at ``temperature`` from ``seed``; the input
  batch must still be a valid batch of pixels but is not read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

from flows import FlowConfig, FlowModel, build_flow
from pipeline.config import flow_config_from_dict
from pipeline.evaluation import seeded_noise

# Recorded in the MLmodel's metadata: how ``load_flow_model`` tells these models from the pickled
# ``mlflow.pytorch`` ones logged before.
FORMAT_KEY = "eiw_flow_format"
FORMAT = "weights+config/1"

WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "flow_config.json"

# The models-from-code file MLflow copies into the model and runs on load.
MODEL_CODE_PATH = Path(__file__).with_name("flow_pyfunc_model.py")

MODES = ("bits_per_dim", "sample")
DEFAULT_PARAMS: dict[str, Any] = {
    "mode": "bits_per_dim",
    "seed": 0,
    "num": 16,
    "temperature": 1.0,
    "num_samples": 1,
}
MAX_IWBO_SAMPLES = 10_000
# One request must not be able to exhaust a serving host's memory.
MAX_SAMPLES = 1024
# Flow passes (images x num_samples) one bits/dim request may cost: a paper-scale model scores ~20-50
# images/s per CPU core, so this finishes well inside the scoring server's default 60 s timeout.
MAX_WORK = 1024


class UnsafeModelFileError(ValueError):
    """A weights file that is not plain tensors: refused before anything in it runs."""


# ---------------------------------------------------------------------------------------- files
def write_flow_files(model: FlowModel, directory: str | Path) -> dict[str, str]:
    """Write ``model``'s weights and config into ``directory``; returns {artifact name: path}."""
    if not isinstance(model, FlowModel):
        raise ValueError(f"expected a flows.FlowModel, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # clone(): torch.save writes a tensor's whole storage, and a view would drag its base along.
    state = {
        name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().contiguous().clone()
        for name, t in model.state_dict().items()
    }
    weights = directory / WEIGHTS_FILE
    config = directory / CONFIG_FILE
    torch.save(state, weights)
    config.write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2, sort_keys=True) + "\n", "utf-8")
    return {WEIGHTS_ARTIFACT: str(weights), CONFIG_ARTIFACT: str(config)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; anything but a flat {name: tensor} mapping is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler stops at the first global it does not allow, before calling it.
        # torch's message goes on to suggest weights_only=False; keep only its reason.
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please use|\n\n|$)", str(e), re.S)
        raise UnsafeModelFileError(
            f"{path}: refusing to load: not a plain tensor file (torch's weights-only loader: "
            f"{' '.join(reason.group(1).split()) if reason else 'rejected'}); nothing in it was run"
        ) from e
    except OSError:
        raise
    except Exception as e:  # truncated, or not a torch file at all (torch raises many kinds)
        raise ValueError(f"{path}: not a readable torch weights file: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnsafeModelFileError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def read_flow_files(
    weights_path: str | Path, config_path: str | Path, *, map_location: str | torch.device = "cpu"
) -> FlowModel:
    """Rebuild the ``FlowModel`` from its config, load its weights (strict), move it, eval mode."""
    try:
        data = json.loads(Path(config_path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not a readable JSON flow config: {e}") from e
    model = build_flow(flow_config_from_dict(data, source=str(config_path)))
    state = read_state_dict(weights_path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path}: the weights do not fit the config in {config_path}: {e}") from e
    return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------- signature
def signature_for(cfg: FlowConfig) -> ModelSignature:
    """Params only: mode, seed, num, temperature, num_samples.

    No input schema: the scoring server would cast the request's pixels to it before ``predict``
    could refuse floats and booleans (module doc). No output schema: the output is float64 ``(N,)``
    bits/dim or uint8 ``(num, C, H, W)`` images, depending on ``mode``, and one schema cannot say both.
    """
    return ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("mode", "string", DEFAULT_PARAMS["mode"]),
                ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
                ParamSpec("num", "long", DEFAULT_PARAMS["num"]),
                ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
                ParamSpec("num_samples", "long", DEFAULT_PARAMS["num_samples"]),
            ]
        ),
    )


def input_example_for(cfg: FlowConfig, num: int = 1) -> np.ndarray:
    """A fixed uint8 batch ``(num, C, H, W)`` of noise: the example MLflow stores and validates."""
    return np.random.default_rng(0).integers(0, 256, size=(num, *cfg.image_shape), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- pyfunc
def _invalid(message: str) -> MlflowException:
    # MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers 400 with this message.
    return MlflowException.invalid_parameter_value(message)


def _as_uint8_batch(model_input: Any, cfg: FlowConfig) -> torch.Tensor:
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.cpu().numpy()
    if not isinstance(model_input, np.ndarray):
        raise _invalid(f"expected a uint8 array (N, C, H, W), got {type(model_input).__name__}")
    # Checked before any cast: a float or boolean pixel is a client bug, not something to truncate.
    if model_input.dtype == np.bool_ or not np.issubdtype(model_input.dtype, np.integer):
        raise _invalid(f"expected uint8 pixels (integers in 0..255), got dtype {model_input.dtype}")
    if model_input.dtype != np.uint8:
        if model_input.size and (model_input.min() < 0 or model_input.max() > 255):
            raise _invalid(
                f"expected pixels in 0..255, got values from {model_input.min()} to {model_input.max()}"
            )
        model_input = model_input.astype(np.uint8)
    if model_input.ndim != 4 or tuple(model_input.shape[1:]) != cfg.image_shape or not len(model_input):
        raise _invalid(
            f"expected a non-empty batch of shape (N, {', '.join(map(str, cfg.image_shape))}), "
            f"got {model_input.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(model_input))


class FlowPyfunc(mlflow.pyfunc.PythonModel):
    """Scores uint8 images in bits/dim, or samples images; see the module docstring for ``params``.

    ``model_config={"device": "cuda"}`` at load time (``mlflow.pyfunc.load_model(..., model_config=)``,
    or MLFLOW_PYFUNC_INFERENCE_CONFIG for ``mlflow models serve``) runs it on a GPU; the default is the CPU.
    """

    model: FlowModel

    def load_context(self, context) -> None:
        device = (context.model_config or {}).get("device", "cpu")
        self.max_work = int((context.model_config or {}).get("max_work", MAX_WORK))
        self.model = read_flow_files(
            context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[CONFIG_ARTIFACT], map_location=device
        )

    # ``np.ndarray`` is a hint MLflow 3 accepts without deriving an input schema from it (a list or
    # dataclass hint would add one, and the server would cast pixels to it: module doc).
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        p = {**DEFAULT_PARAMS, **(params or {})}
        mode, seed = p["mode"], int(p["seed"])
        generator = torch.Generator().manual_seed(seed)
        device = next(self.model.parameters()).device
        if mode == "bits_per_dim":
            x = _as_uint8_batch(model_input, self.model.cfg).to(device)
            num_samples = int(p["num_samples"])
            if not 1 <= num_samples <= MAX_IWBO_SAMPLES:
                raise _invalid(f"num_samples: must be in 1..{MAX_IWBO_SAMPLES}, got {num_samples}")
            budget = getattr(self, "max_work", MAX_WORK)
            if len(x) * num_samples > budget:
                raise _invalid(
                    f"{len(x)} images x num_samples {num_samples} = {len(x) * num_samples} flow passes, "
                    f"more than this server's budget of {budget} per request: send fewer images or "
                    "fewer samples per request"
                )
            with torch.no_grad(), seeded_noise(seed, device):
                if num_samples == 1:
                    bpd = self.model.bits_per_dim(x, generator=generator)
                else:
                    bpd = self.model.iwbo_bits_per_dim(x, num_samples)
            return bpd.to(torch.float64).cpu().numpy()
        if mode == "sample":
            num, temperature = int(p["num"]), float(p["temperature"])
            if not 1 <= num <= MAX_SAMPLES:
                raise _invalid(f"num: must be in 1..{MAX_SAMPLES}, got {num}")
            if not 0.0 <= temperature < math.inf:
                raise _invalid(f"temperature: must be a finite number >= 0, got {temperature}")
            return self.model.sample(num, temperature, generator=generator).cpu().numpy()
        raise _invalid(f"mode: unknown {mode!r}; choose one of {MODES}")
