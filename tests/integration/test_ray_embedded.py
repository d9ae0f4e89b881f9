"""The embedded Ray that ``ray_session`` starts when no cluster is named: Ray 2.60 accepts its
settings, its Train workers run at niceness 0 (Ray's default is 15) and see the settings' environment.

Runs in a subprocess: the other integration tests share one Ray instance started by a fixture, and
``ray_session`` uses an instance that is already up instead of starting its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, tempfile
import ray.train
from ray.train.torch import TorchTrainer
from pipeline.config import load_config
from pipeline.ray_adapter import ray_session

def worker(config):  # Ray keeps no metrics without a checkpoint: the worker writes them to a file
    with open(config["out"], "w") as f:
        json.dump({"niceness": os.nice(0)}, f)

cfg = load_config(sys.argv[1], ["ray.num_cpus=2"])
with tempfile.TemporaryDirectory() as d, ray_session(cfg):
    inside = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    out = os.path.join(d, "worker.json")
    TorchTrainer(worker, train_loop_config={"out": out},
                 scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(name="lean", storage_path=d)).fit()
    worker = json.load(open(out))
print("RESULT", json.dumps({"inside": inside, "after": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
                            **worker}))
"""


def test_embedded_ray_starts_workers_at_niceness_zero(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS",)}
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "configs" / "tiny.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["niceness"] == 0
    assert result["inside"] == "0" and result["after"] is None
