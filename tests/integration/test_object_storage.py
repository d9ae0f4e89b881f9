"""Object storage end to end, against a real S3-protocol server (moto's standalone server) on 127.0.0.1:
shards written there by the CLI a user runs and verified where they live; a tiny Ray Train run whose
data, checkpoints and MLflow artifacts (an ``mlflow server`` with ``--artifacts-destination s3://...``)
live in the bucket, a worker failure injected, the resume from the checkpoint in the bucket; the
plain loop's own checkpoints in the bucket; a two-trial Tune search whose state is in the bucket,
interrupted and resumed from it. Credentials and the endpoint reach every client (s3fs, pyarrow in
Ray, boto3 in MLflow) through the environment only, as on a cloud cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline.checkpoint import STATE_FILE, checkpoint_name, list_checkpoints, read_checkpoint
from pipeline.config import TrainConfig, checkpoint_root, load_config, resolve
from pipeline.faults import Faults, InjectedFault
from tests.integration.conftest import MLFLOW, START_TIMEOUT_S, _stop, _wait_healthy, free_port

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REPO = Path(__file__).resolve().parents[2]
BUCKET = "eiw-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port, a bucket, and the AWS_* variables pointing at it
    (set in this process for the module's duration, restored afterwards)."""
    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = root / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,  # what MLflow's S3 artifact store reads
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not up after {START_TIMEOUT_S}s") from None
                time.sleep(0.3)
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint=endpoint, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)


@pytest.fixture(scope="module")
def s3_mlflow_server(s3_server, tmp_path_factory):
    """An ``mlflow server`` whose artifacts go to the bucket (proxied: clients upload through it)."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def s3_shards(s3_server) -> str:
    """The built-in sample set, tiny, written to the bucket by ``python -m data_prep sample --output s3://``."""
    uri = f"s3://{BUCKET}/data/sample-32-tiny"
    done = subprocess.run(
        [sys.executable, "-m", "data_prep", "sample", "--output", uri, "--n-train", "64", "--n-test", "32",
         "--shard-size", "16", "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    keys = s3_server.keys("data/sample-32-tiny/")
    for split, shards in (("train", 4), ("test", 2)):
        assert f"data/sample-32-tiny/{split}/manifest.json" in keys
        assert sum(k.startswith(f"data/sample-32-tiny/{split}/{split}-") for k in keys) == shards
    return uri


@pytest.fixture
def ray_with_s3_env(s3_server):
    """Local Ray whose workers see the AWS_* variables (a Ray started earlier in the session did not
    have them: it is replaced for this test and a plain one put back afterwards)."""
    import ray

    earlier = ray.is_initialized()
    if earlier:
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": s3_server.env})
    try:
        yield ray
    finally:
        ray.shutdown()
        if earlier:  # the session's ray_local, as conftest.py starts it
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)


def tiny(shards: str, tracking_uri: str, name: str, *overrides: str) -> TrainConfig:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            "data.source=shards",
            f"data.root={shards}",
            f"run.root=s3://{BUCKET}/runs",
            f"mlflow.tracking_uri={tracking_uri}",
            f"run.name={name}",
            "ray.use_gpu=false",
            "run.progress_bar=false",
            "run.checkpoint_every=2",
            "mlflow.register=false",
            "mlflow.log_checkpoint=true",
            "mlflow.system_metrics=false",
            *overrides,
        ],
    )
    return resolve(cfg)


def test_a_ray_run_with_data_checkpoints_and_artifacts_in_a_bucket_survives_a_fault(
    s3_server, s3_shards, s3_mlflow_server, ray_with_s3_env
):
    from pipeline.data import ensure_data
    from pipeline.ray_adapter import fit_with_ray

    cfg = tiny(s3_shards, s3_mlflow_server, "s3-ray")
    assert cfg.data.root == s3_shards and cfg.run.root == f"s3://{BUCKET}/runs"
    ensure_data(cfg.data, cfg.model.image_shape)
    result = fit_with_ray(cfg, faults=Faults(fail_at_step=5))  # rank 0 dies once, before step 5

    assert result.step == 8 and result.checkpoint_path is not None
    assert result.checkpoint_path.startswith(f"{BUCKET}/runs/checkpoints/s3-ray/")  # pyarrow's path
    run_dir = checkpoint_root(cfg) / cfg.run.name
    assert str(run_dir) == f"s3://{BUCKET}/runs/checkpoints/s3-ray"
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == [checkpoint_name(6), checkpoint_name(8)], names  # keep_checkpoints: 2
    assert read_checkpoint(run_dir / checkpoint_name(8))["step"] == 8
    run = MlflowClient(s3_mlflow_server).get_run(result.mlflow_run_id)
    assert run.data.tags["pipeline.resumed_from_step"] == "4"  # from the checkpoint in the bucket
    assert run.data.metrics["test/bits_per_dim"] == pytest.approx(result.test_bits_per_dim)
    assert "s3-ray" in run.data.tags.get("mlflow.runName", "")
    keys = s3_server.keys("")
    assert "runs/checkpoints/s3-ray/.fault-injected-step5" in keys
    artifacts = [k for k in keys if k.startswith("mlartifacts/") and result.mlflow_run_id in k]
    assert any(k.endswith(f"checkpoint/{checkpoint_name(8)}/{STATE_FILE}") for k in artifacts), artifacts
    assert any(k.endswith("config.yaml") for k in artifacts)
    assert any("/samples/" in k for k in artifacts)
    assert any(k.endswith("weights.pt") for k in keys if k.startswith("mlartifacts/"))  # the logged model


def test_the_plain_loop_keeps_its_checkpoints_in_a_bucket_and_resumes_from_them(
    s3_server, s3_shards, s3_mlflow_server
):
    from pipeline.loop import fit

    cfg = tiny(s3_shards, s3_mlflow_server, "s3-plain", "ray.enabled=false", "mlflow.log_model=false",
               "mlflow.log_checkpoint=false", "run.epochs=1")  # fmt: skip
    with pytest.raises(InjectedFault):
        fit(cfg, faults=Faults(fail_at_step=3))
    run_dir = checkpoint_root(cfg) / cfg.run.name
    assert [p.name for p in list_checkpoints(run_dir)] == [checkpoint_name(2)]

    result = fit(cfg)
    assert result.step == 4
    run = MlflowClient(s3_mlflow_server).get_run(result.mlflow_run_id)
    assert run.data.tags["pipeline.resumed_from_step"] == "2"
    keys = s3_server.keys("runs/checkpoints/s3-plain/")
    # Finished runs keep their last checkpoints; staging never reaches the bucket (state.pt is the
    # commit point, uploaded last).
    assert f"runs/checkpoints/s3-plain/{checkpoint_name(2)}/{STATE_FILE}" in keys
    assert not any("/.tmp-" in k for k in keys), keys


def _verify(target: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", "verify", target, "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_verify_checks_shards_where_they_live_in_the_bucket(s3_server, s3_shards, tmp_path):
    import boto3

    done = _verify(s3_shards)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{s3_shards}: OK"

    # A copy of the test split with one shard damaged in place: one flipped byte inside the first
    # image's PNG (sha256 and decode fail) and an unlisted object next to the shards.
    s3 = boto3.client("s3")
    src, dst = "data/sample-32-tiny/test/", "data/damaged/test/"
    for key in s3_server.keys(src):
        s3.copy_object(Bucket=BUCKET, Key=dst + key[len(src) :], CopySource={"Bucket": BUCKET, "Key": key})
    shard = sorted(k for k in s3_server.keys(dst) if k.endswith(".tar"))[0]
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=shard)["Body"].read())
    at = body.index(b"IDAT") + 8
    body[at] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=shard, Body=bytes(body))
    s3.put_object(Bucket=BUCKET, Key=dst + "stray.tar", Body=b"")

    remote = _verify(f"s3://{BUCKET}/data/damaged/test")
    assert remote.returncode == 1, remote.stdout + remote.stderr
    name = shard.rsplit("/", 1)[1]
    assert f"{name}: sha256 " in remote.stdout and "png does not decode" in remote.stdout
    assert "stray.tar: not listed in the manifest" in remote.stdout

    # The same checks as on a local folder: the same findings, line for line (paths aside).
    local = tmp_path / "test"
    local.mkdir()
    for key in s3_server.keys(dst):
        s3.download_file(BUCKET, key, str(local / key[len(dst) :]))
    here = _verify(str(local))
    assert here.returncode == 1
    relative = [line.replace(str(local), "<split>") for line in here.stdout.splitlines()]
    remotely = [
        line.replace(f"s3://{BUCKET}/data/damaged/test", "<split>") for line in remote.stdout.splitlines()
    ]
    assert relative == remotely


class InterruptAfterFirstCompletion(tune.Callback):
    """SIGINT this process (Tune's Ctrl-C handler) when the first trial completes, once (the marker
    keeps the copy Tune pickles with the experiment quiet after the resume)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)


def test_a_search_with_its_state_in_a_bucket_resumes_from_it(
    s3_server, s3_shards, s3_mlflow_server, ray_with_s3_env, tmp_path
):
    import yaml

    from tune.search import run_search
    from tune.spec import spec_from_dict

    data = yaml.safe_load((CONFIGS / "tune" / "tiny.yaml").read_text())
    data["base_config"] = str(CONFIGS / "tiny.yaml")
    data["overrides"].update({"data.root": s3_shards, "run.epochs": 2, "mlflow.log_checkpoint": False})
    data["space"] = {"optim.lr": {"grid": [3.0e-3, 1.0e-3]}}  # two trials, one after the other
    data["search"]["max_concurrent_trials"] = 1
    data["scheduler"] = {"type": "none"}
    data["run"] = {"name": "s3-search", "storage_path": f"s3://{BUCKET}/tune/"}
    data["mlflow"].update(
        tracking_uri=s3_mlflow_server, experiment="tune-s3-test", registered_model_name="tune-s3-test"
    )
    spec = spec_from_dict(data)
    marker = tmp_path / "interrupted-after"
    first = run_search(spec, callbacks=[InterruptAfterFirstCompletion(marker)])
    assert marker.exists() and first.interrupted and not first.resumed
    assert str(first.experiment_path) == f"s3://{BUCKET}/tune/s3-search"
    keys = s3_server.keys("tune/s3-search/")
    assert any(k.rsplit("/", 1)[1].startswith("experiment_state-") for k in keys), keys
    done_id = marker.read_text()
    assert f"tune/s3-search/trial_id={done_id}/result.json" in keys

    # A new driver process would start a new Ray; so does this one, with the same environment.
    ray_with_s3_env.shutdown()
    ray_with_s3_env.init(address="local", num_cpus=4, include_dashboard=False,
                         runtime_env={"env_vars": s3_server.env})  # fmt: skip
    second = run_search(spec)
    assert second.resumed and not second.interrupted
    assert second.parent_run_id == first.parent_run_id
    rows = {row.trial_id: row for row in second.rows}
    assert len(rows) == 2 and all(row.status == "completed" for row in rows.values()), rows
    # The trial finished before the interruption was not run again: its reports, read from the
    # bucket, are the two of its first run.
    import boto3

    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"tune/s3-search/trial_id={done_id}/result.json")
    steps = [yaml.safe_load(line)["step"] for line in body["Body"].read().decode().splitlines() if line]
    assert steps == [4, 8]
    assert second.model_version is not None
    # The trials' Ray Train checkpoints live under the search's prefix too.
    assert any("/checkpoints/" in k for k in s3_server.keys("tune/s3-search/")), keys
