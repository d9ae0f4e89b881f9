"""Live tracking against a real ``mlflow server`` (sqlite backend, proxied artifacts): metrics while
the run trains, each step once across a fault-injected restart, system metrics, the sample slider,
the order picture, and the run naming its data (manifest digests) and code (git commit).

The plain loop (no Ray, so the test stays short); tests/integration/test_pipeline_train.py restarts
Ray workers."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, resolve
from pipeline.faults import Faults, InjectedFault
from pipeline.lineage import GIT_COMMIT_TAG, GIT_COMMITS_TAG, GIT_DIRTY_TAG
from pipeline.loop import fit
from pipeline.tracking import image_key_and_step

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAIN_KEYS = (
    "train/bits_per_dim", "train/regularizer", "train/grad_norm", "train/lr", "train/images_per_s",
    "train/images_per_s_per_worker",
)  # fmt: skip


def manifest_digest(split_dir: Path) -> str:
    """The documented digest, computed here from the manifest alone."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    lines = "".join(f"{s['name']} {s['sha256']} {s['count']}\n" for s in manifest["shards"])
    return hashlib.sha256(lines.encode()).hexdigest()


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for info in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return found


def test_live_metrics_each_step_once_across_a_restart_with_data_and_code(
    tmp_path, tiny_shards, mlflow_server, monkeypatch
):
    torch.set_num_threads(1)
    # Every file tries a multipart upload; the server's local artifact store has none, so MLflow
    # falls back to one PUT per file (what a small or non-S3 deployment does).
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "1")
    cfg = resolve(
        load_config(
            REPO / "configs" / "tiny.yaml",
            [
                f"data.root={tiny_shards}", f"run.root={tmp_path / 'runs'}", "run.name=live",
                f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.registered_model=tiny-live",
                "mlflow.experiment=live-metrics",
                "mlflow.system_metrics_interval_s=0.5", "ray.enabled=false", "run.progress_bar=false",
                "run.num_threads=1", "run.log_every=2", "run.checkpoint_every=4",
            ],
        ),
        cwd=tmp_path,
    )  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    faults = Faults(fail_at_step=7)  # after the checkpoint at 4 and the log step 6

    with pytest.raises(InjectedFault):
        fit(cfg, faults=faults)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    # Step 6 is in MLflow although no checkpoint covers it: the metrics went out live.
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/bits_per_dim")) == [2, 4, 6]

    result = fit(cfg, faults=faults)  # resumes from step 4 and recomputes 5 and 6
    assert result.mlflow_run_id == run_id and result.step == 8
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.resumed_from_step"] == "4"
    for key in (*TRAIN_KEYS, *(f"diag/{k}" for k in result.diagnostics)):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [2, 4, 6, 8], (key, steps)  # a point every log_every steps, each once
    assert sorted(m.step for m in client.get_metric_history(run_id, "test/bits_per_dim")) == [4, 8]
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )

    # The sample slider: one image per temperature at each evaluation, none twice.
    artifacts = all_artifacts(client, run_id)
    images = sorted(
        image_key_and_step(p) for p in artifacts if p.startswith("images/") and p.endswith(".png")
    )
    assert images == [("samples_T0.7", 4), ("samples_T0.7", 8), ("samples_T1", 4), ("samples_T1", 8)]
    assert {"order/kept_share.png", "order/kept_share.npz", "config.yaml"} <= set(artifacts)
    assert "checkpoint/checkpoint_000000008/state.pt" in artifacts  # small: log_checkpoint auto keeps it

    # Data: both splits as dataset inputs whose digest is the manifests'.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "testing"}
    for context, split in (("training", "train"), ("testing", "test")):
        full = manifest_digest(tiny_shards / split)
        assert inputs[context].digest == full[:16]
        profile = json.loads(inputs[context].profile)
        assert profile["shards_sha256"] == full
        assert (profile["source"], profile["resolution"]) == ("sample", [32, 32])

    # Code: a commit of this repository (HEAD or, if someone committed meanwhile, its ancestor).
    commit = run.data.tags[GIT_COMMIT_TAG]
    ancestor = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"])
    assert ancestor.returncode == 0, commit
    assert run.data.tags[GIT_DIRTY_TAG] in ("true", "false")
    assert run.data.tags[GIT_COMMITS_TAG].split(",")[-1] == commit

    # The registered model carries the resolved config and the same lineage.
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/tiny-live/{result.model_version}",
        dst_path=str(tmp_path / "model"),
        tracking_uri=mlflow_server.uri,
        registry_uri=mlflow_server.uri,
    )
    metadata = Model.load(local).metadata
    assert metadata["config"]["run"]["log_every"] == 2
    assert metadata["datasets"]["training"]["digest"] == inputs["training"].digest
    assert metadata["code"]["commit"] == commit
