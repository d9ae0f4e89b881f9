"""The registered model against real services: a real ``mlflow server`` (sqlite backend), the pyfunc
loaded by alias, ``mlflow models serve --env-manager local`` answering HTTP on 127.0.0.1 from a venv
without this project, and a model whose weights were replaced in the server's artifact store being
refused without running anything.

"Without this project": ``bare_venv`` is a fresh ``python -m venv`` whose only addition is a ``.pth``
line naming the training venv's site-packages. A path line adds that folder to ``sys.path`` but does
not run the ``.pth`` files inside it, so the editable install's import hook never loads: the venv
has MLflow, torch and their dependencies, and ``import pipeline`` / ``import flows`` fail (asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import flows
from pipeline.config import MlflowConfig
from pipeline.flow_pyfunc import WEIGHTS_FILE, UnsafeModelFileError
from pipeline.registry import BPD_TAG, load_flow_model, log_flow_model, register, save_flow_model
from tests.integration.conftest import START_TIMEOUT_S, _stop, free_port
from tests.tiny_models import random_images, tiny_flow

pytestmark = pytest.mark.integration

SHAPE = (3, 16, 16)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return random_images(n, seed, SHAPE)


def bpd(model: flows.FlowModel, x: torch.Tensor, seed: int) -> np.ndarray:
    with torch.no_grad():
        return model.bits_per_dim(x, generator=torch.Generator().manual_seed(seed)).double().numpy()


def log_and_register(server, name: str, model: flows.FlowModel, test_bpd: float):
    """What the training loop does on rank 0: log the model in a run, then register it."""
    mlflow.set_tracking_uri(server.uri)
    # An explicit experiment, not mlflow.set_experiment: that would stay the process's active
    # experiment (and MLFLOW_EXPERIMENT_ID) for every later test, and reopening a run of another
    # experiment then fails in MLflow's start_run.
    client = mlflow.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("model-serving")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("model-serving")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        model_uri = log_flow_model(model, test_bpd=test_bpd)
    cfg = MlflowConfig(tracking_uri=server.uri, registered_model=name)
    return model_uri, register(model_uri, cfg=cfg, test_bpd=test_bpd, run_id=run.info.run_id)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A venv with the training venv's libraries but not this project (see the module docstring)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "training_venv_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The console scripts pip would have written: ``mlflow models serve`` execs ``uvicorn`` by name.
    for name, entry in {"mlflow": "mlflow.cli:cli", "uvicorn": "uvicorn.main:main"}.items():
        module, func = entry.split(":")
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv}/bin/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        script.chmod(0o755)
    return venv


def bare_env(venv: Path) -> dict[str, str]:
    """This process's environment minus what would make the project importable, venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {
        **env,
        "PATH": os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]),
        "VIRTUAL_ENV": str(venv),
    }


OUT_OF_PROJECT_SCORE = """
import importlib.util, sys
import mlflow, numpy as np
for name in ("pipeline", "flows", "data_prep"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: {importlib.util.find_spec(name)}"
model_dir, images, out = sys.argv[1:]
pyfunc = mlflow.pyfunc.load_model(model_dir)
np.save(out, pyfunc.predict(np.load(images), params={"seed": 3, "num_samples": 2}))
print("loaded from", sys.modules["pipeline.flow_pyfunc"].__file__)
"""


def test_saved_model_loads_and_scores_where_the_project_is_not_importable(bare_venv, tmp_path):
    model = tiny_flow(shape=SHAPE)
    path = save_flow_model(model, tmp_path / "model", test_bpd=6.0)
    x = images(5, seed=4).numpy()
    np.save(tmp_path / "x.npy", x)
    want = mlflow.pyfunc.load_model(str(path)).predict(x, params={"seed": 3, "num_samples": 2})

    work = tmp_path / "elsewhere"
    work.mkdir()
    python = bare_venv / "bin" / "python"
    # -I: no PYTHONPATH, no user site, and the script's folder (not the cwd) is not put on sys.path.
    probe = [str(python), "-I", "-c", "import pipeline"]
    refused = subprocess.run(probe, cwd=work, env=bare_env(bare_venv), capture_output=True, text=True)
    assert refused.returncode == 1 and "No module named 'pipeline'" in refused.stderr

    cmd = [str(python), "-I", "-c", OUT_OF_PROJECT_SCORE, str(path), str(tmp_path / "x.npy"), "got.npy"]
    done = subprocess.run(cmd, cwd=work, env=bare_env(bare_venv), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # The code it ran is the copy inside the model, not this checkout's.
    assert f"loaded from {path.resolve() / 'code' / 'pipeline' / 'flow_pyfunc.py'}" in done.stdout
    got = np.load(work / "got.npy")
    assert got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def registered(mlflow_server):
    model = tiny_flow(shape=SHAPE)
    _, version = log_and_register(mlflow_server, "serving-tiny", model, test_bpd=6.25)
    return model, version


def test_registered_pyfunc_scores_and_samples(mlflow_server, registered):
    model, version = registered
    client = MlflowClient(mlflow_server.uri)
    champion = client.get_model_version_by_alias("serving-tiny", "champion")
    assert champion.version == version.version and float(champion.tags[BPD_TAG]) == 6.25

    pyfunc = mlflow.pyfunc.load_model("models:/serving-tiny@champion")
    x = images(6, seed=5)
    got = pyfunc.predict(x.numpy(), params={"seed": 11})
    assert got.dtype == np.float64 and got.shape == (6,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, bpd(model, x, seed=11), rtol=0, atol=1e-6)

    drawn = pyfunc.predict(x.numpy(), params={"mode": "sample", "num": 3, "temperature": 0.7, "seed": 2})
    assert drawn.dtype == np.uint8 and drawn.shape == (3, *SHAPE)

    # load_flow_model keeps returning the FlowModel, now rebuilt from those files.
    loaded = load_flow_model("models:/serving-tiny@champion", tracking_uri=mlflow_server.uri)
    assert isinstance(loaded, flows.FlowModel)
    np.testing.assert_array_equal(bpd(loaded, x, seed=11), bpd(model, x, seed=11))


def _post(url: str, payload: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _wait_serving(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve not up after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def test_mlflow_models_serve_answers_with_the_same_bits_per_dim(
    mlflow_server, registered, bare_venv, tmp_path
):
    """Served from ``bare_venv``, where this project is not importable: the model's own code runs."""
    model, _ = registered
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [
        str(bare_venv / "bin" / "mlflow"), "models", "serve",
        "-m", "models:/serving-tiny@champion",
        "--env-manager", "local",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {**bare_env(bare_venv), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_serving(url, proc, log)
        x = images(4, seed=9)
        status, body = _post(f"{url}/invocations", {"inputs": x.tolist(), "params": {"seed": 7}})
        assert status == 200, body
        got = np.asarray(body["predictions"], dtype=np.float64)
        np.testing.assert_allclose(got, bpd(model, x, seed=7), rtol=0, atol=1e-4)

        sample = {"mode": "sample", "num": 2, "temperature": 0.7, "seed": 1}
        status, body = _post(f"{url}/invocations", {"inputs": x[:1].tolist(), "params": sample})
        assert status == 200, body
        drawn = np.asarray(body["predictions"])
        assert drawn.shape == (2, *SHAPE) and drawn.min() >= 0 and drawn.max() <= 255
        want = model.sample(2, 0.7, generator=torch.Generator().manual_seed(1)).numpy()
        np.testing.assert_array_equal(drawn, want)

        status, body = _post(f"{url}/invocations", {"inputs": x.tolist(), "params": {"mode": "score"}})
        assert status == 400 and "mode: unknown 'score'" in body
    finally:
        _stop(proc)
    assert proc.poll() is not None


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_weights_in_the_artifact_store_are_refused(mlflow_server, tmp_path):
    model_uri, _ = log_and_register(mlflow_server, "serving-tampered", tiny_flow(shape=SHAPE), test_bpd=7.0)
    model_id = model_uri.removeprefix("models:/")
    (weights,) = (mlflow_server.root / "artifacts").rglob(f"{model_id}/**/{WEIGHTS_FILE}")
    marker = tmp_path / "ran"
    torch.save({"levels.0.weight": Payload(marker)}, weights)
    torch.load(weights, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeModelFileError, match="refusing to load"):
        load_flow_model("models:/serving-tampered@newest", tracking_uri=mlflow_server.uri)
    with pytest.raises(UnsafeModelFileError):
        mlflow.pyfunc.load_model("models:/serving-tampered@newest")
    assert not marker.exists()
