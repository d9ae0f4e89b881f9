"""The registered model's files, its pyfunc and load_flow_model, on local directories (no server).

A saved model is weights as tensors plus the config; loading rebuilds the FlowModel from code. A
weights file that is a pickle with a payload is refused before the payload runs, and so is an old
pickled mlflow.pytorch model unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

import flows
from pipeline.flow_pyfunc import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UnsafeModelFileError,
    read_flow_files,
    write_flow_files,
)
from pipeline.registry import load_flow_model, save_flow_model
from tests.tiny_models import SHAPE, tiny_flow
from tests.tiny_models import random_images as images


def bpd(model: flows.FlowModel, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model.bits_per_dim(x, generator=torch.Generator().manual_seed(seed))


class Payload:
    """Unpickling this creates ``marker``: stands for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path, *, torch_format: bool) -> None:
    if torch_format:
        torch.save({"levels.0.weight": Payload(marker)}, path)  # a torch zip archive around the pickle
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # torch reads protocol 2 opcodes


def test_the_payload_is_live_when_unpickled(tmp_path):
    # Guards the tamper tests below: their payload really does create the marker when unpickled.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.fixture(scope="module")
def flow() -> flows.FlowModel:
    return tiny_flow()


@pytest.fixture(scope="module")
def saved(flow, tmp_path_factory) -> Path:
    return save_flow_model(flow, tmp_path_factory.mktemp("saved") / "model", test_bpd=5.5)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


# ---------------------------------------------------------------------------------------- files
def test_files_round_trip_the_state_and_the_held_permutation(flow, tmp_path):
    files = write_flow_files(flow, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = read_flow_files(files["weights"], files["config"])
    assert isinstance(loaded, flows.FlowModel) and not loaded.training
    assert loaded.cfg == flow.cfg and loaded.cfg.image_shape == SHAPE  # a tuple again
    want = flow.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    assert all(split.strategy._is_frozen for split in loaded.splits)  # the Python mirror of the buffer
    assert torch.equal(bpd(loaded, images(4)), bpd(flow, images(4)))
    g = torch.Generator
    assert torch.equal(
        loaded.sample(3, 0.7, generator=g().manual_seed(1)), flow.sample(3, 0.7, generator=g().manual_seed(1))
    )


def test_config_is_plain_json_and_read_strictly(flow, tmp_path):
    files = write_flow_files(flow, tmp_path)
    data = json.loads(Path(files["config"]).read_text())
    assert data["image_shape"] == list(SHAPE) and data["split"]["strategy"] == "eiw"

    # A model written before a field existed loads with that field's default.
    del data["split"]["ema_momentum"]
    Path(files["config"]).write_text(json.dumps(data))
    assert read_flow_files(files["weights"], files["config"]).cfg.split.ema_momentum == 0.99

    data["split"]["no_such_knob"] = 1
    Path(files["config"]).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="split.no_such_knob"):
        read_flow_files(files["weights"], files["config"])


def test_weights_that_do_not_fit_the_config_are_an_error(flow, tmp_path):
    files = write_flow_files(flow, tmp_path)
    data = json.loads(Path(files["config"]).read_text())
    data["hidden_channels"] = 16
    Path(files["config"]).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not fit the config"):
        read_flow_files(files["weights"], files["config"])


@pytest.mark.parametrize("torch_format", [False, True], ids=["raw-pickle", "torch-save"])
def test_tampered_weights_are_refused_before_anything_runs(flow, tmp_path, torch_format):
    files = write_flow_files(flow, tmp_path / "files")
    marker = tmp_path / "ran"
    write_payload(Path(files["weights"]), marker, torch_format=torch_format)
    with pytest.raises(UnsafeModelFileError, match="refusing to load.*GLOBAL .*open") as refused:
        read_flow_files(files["weights"], files["config"])
    assert "weights_only` set to `False`" not in str(refused.value)  # not torch's advice to do so
    assert not marker.exists()


def test_a_weights_file_that_is_not_a_mapping_of_tensors_is_refused(flow, tmp_path):
    files = write_flow_files(flow, tmp_path)
    torch.save([torch.zeros(1)], files["weights"])
    with pytest.raises(UnsafeModelFileError, match="mapping of parameter names to tensors"):
        read_flow_files(files["weights"], files["config"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_a_value_error(flow, tmp_path, damage):
    files = write_flow_files(flow, tmp_path)
    weights = Path(files["weights"])
    data = {"truncated": weights.read_bytes()[:500], "garbage": b"not a torch file", "empty": b""}[damage]
    weights.write_bytes(data)
    # Garbage reaches torch's restricted unpickler, which refuses it like a payload.
    with pytest.raises(ValueError, match="not a readable torch weights file|refusing to load"):
        read_flow_files(weights, files["config"])


# ---------------------------------------------------------------------------------------- saved model
def test_saved_model_is_weights_config_and_a_code_file(saved):
    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # nothing cloudpickled
    assert {a["path"] for a in flavor["artifacts"].values()} == {
        f"artifacts/{WEIGHTS_FILE}",
        f"artifacts/{CONFIG_FILE}",
    }
    assert mlmodel["metadata"]["eiw_flow_format"] == "weights+config/1"
    assert mlmodel["metadata"]["test_bits_per_dim"] == 5.5
    assert not list(saved.rglob("*.pkl")) and "pytorch" not in mlmodel["flavors"]
    signature = mlflow.models.Model.load(str(saved)).signature
    assert signature.inputs is None  # the scoring server would cast pixels to it (flow_pyfunc.py)
    assert {p.name for p in signature.params.params} == {"mode", "seed", "num", "temperature", "num_samples"}


def test_load_flow_model_rebuilds_the_flow(flow, saved):
    loaded = load_flow_model(str(saved))
    assert isinstance(loaded, flows.FlowModel) and not loaded.training
    assert torch.equal(bpd(loaded, images(4)), bpd(flow, images(4)))


def test_pyfunc_scores_in_bits_per_dim_and_samples(flow, saved):
    pyfunc = mlflow.pyfunc.load_model(str(saved))
    x = images(5, seed=7)
    got = pyfunc.predict(x.numpy(), params={"seed": 3})
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (5,)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, bpd(flow, x, seed=3).double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pyfunc.predict(x.numpy(), params={"seed": 3}), got)  # reproducible
    assert not np.array_equal(pyfunc.predict(x.numpy(), params={"seed": 4}), got)  # the seed is used
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), bpd(flow, x, seed=0).double().numpy(), atol=1e-6)

    drawn = pyfunc.predict(x.numpy(), params={"mode": "sample", "num": 2, "temperature": 0.5, "seed": 1})
    assert drawn.dtype == np.uint8 and drawn.shape == (2, *SHAPE)
    want = flow.sample(2, 0.5, generator=torch.Generator().manual_seed(1)).numpy()
    np.testing.assert_array_equal(drawn, want)


def test_pyfunc_rejects_bad_params_and_inputs(saved):
    pyfunc = mlflow.pyfunc.load_model(str(saved))
    x = images(2).numpy()
    with pytest.raises(MlflowException, match="mode: unknown 'score'"):
        pyfunc.predict(x, params={"mode": "score"})
    with pytest.raises(MlflowException, match="num: must be in 1..1024"):
        pyfunc.predict(x, params={"mode": "sample", "num": 0})
    with pytest.raises(MlflowException):
        pyfunc.predict(x.astype(np.float32))  # floats are refused, never cast
    with pytest.raises(MlflowException):
        pyfunc.predict(x[:, :, :4])


def test_tampered_saved_model_is_refused_by_both_loaders(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    marker = tmp_path / "ran"
    write_payload(model_dir / "artifacts" / WEIGHTS_FILE, marker, torch_format=True)
    with pytest.raises(UnsafeModelFileError):
        load_flow_model(str(model_dir))
    with pytest.raises(UnsafeModelFileError):
        mlflow.pyfunc.load_model(str(model_dir))
    assert not marker.exists()


def test_an_artifact_path_outside_the_model_is_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["artifacts"]["weights"]["path"] = "../../elsewhere.pt"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ValueError, match="not a file inside the model"):
        load_flow_model(str(model_dir))


def test_an_unknown_format_version_is_an_error(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["metadata"]["eiw_flow_format"] = "weights+config/99"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ValueError, match="weights\\+config/99"):
        load_flow_model(str(model_dir))


# ---------------------------------------------------------------------------------------- old pickles
@pytest.fixture(scope="module")
def old_pickled(flow, tmp_path_factory) -> Path:
    """A model as the pipeline logged them before: an mlflow.pytorch pickle."""
    import mlflow.pytorch

    path = tmp_path_factory.mktemp("old") / "model"
    mlflow.pytorch.save_model(flow, str(path), serialization_format="pickle", pip_requirements=["torch"])
    return path


def test_an_old_pickled_model_needs_the_explicit_opt_in(flow, old_pickled):
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_flow_model(str(old_pickled))
    loaded = load_flow_model(str(old_pickled), allow_pickle=True)
    assert isinstance(loaded, flows.FlowModel)
    assert torch.equal(bpd(loaded, images(2)), bpd(flow, images(2)))


def test_an_old_pickled_model_is_refused_without_running_it(old_pickled, tmp_path):
    model_dir = copy_of(old_pickled, tmp_path)
    (pickled,) = [p for p in model_dir.rglob("*.pth")]
    marker = tmp_path / "ran"
    write_payload(pickled, marker, torch_format=True)
    with pytest.raises(ValueError, match="refusing to load a pickled"):
        load_flow_model(str(model_dir))
    assert not marker.exists()


def test_pyfunc_model_config_chooses_the_device(saved, monkeypatch):
    # "meta" stands in for "cuda" on a machine without a GPU: the setting reaches the rebuilt model.
    def devices(pyfunc) -> set[str]:
        return {p.device.type for p in pyfunc.unwrap_python_model().model.parameters()}

    assert devices(mlflow.pyfunc.load_model(str(saved))) == {"cpu"}
    assert devices(mlflow.pyfunc.load_model(str(saved), model_config={"device": "meta"})) == {"meta"}
    # What `mlflow models serve` reads, as it takes no model_config argument.
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"device": "meta"}))
    assert devices(mlflow.pyfunc.load_model(str(saved))) == {"meta"}
