"""The quick start's console: the project's lines, and at most 15 from the libraries (issue 22).

``python -m pipeline.train`` on the tiny config, on the embedded Ray it starts itself (a subprocess:
the other integration tests share a Ray instance, which ``ray_session`` would join instead). Before
pipeline/logging_setup.py, the quick start printed 73 "PlacementGroupCleaner: Failed to query ..."
warnings and Ray Train's ``TrainingReport(...)`` dump at every checkpoint among 159 lines; on
2026-12-04 ``python -m pipeline.train --config configs/sample.yaml`` printed 51 lines, 4 of them not
the project's (Ray's start and token notice, MLflow's two registry lines).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MAX_LIBRARY_LINES = 15
# pipeline/logging_setup.py's format for the project's loggers (maybe behind Ray's "(RayTrainWorker pid=...)"
# prefix), and the lines pipeline.train prints at the end.
PROJECT_LINE = re.compile(
    r"\d{2}:\d{2}:\d{2},\d{3} (pipeline|flows|data_prep|tune)(\.\w+)*: |^(done: |registered |error: )"
)


# A Ray process's lines arrive behind "(ActorName pid=N) "; a traceback's body (indented frames, the
# header and the exception line) belongs to the message above it. On an overloaded machine Ray Train
# warns, with a traceback, that a resource request timed out ("safe to ignore ... CPU being
# overloaded"): one message, counted once.
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\([\w:]+ pid=\d+\)(\x1b\[0m)? ")
TRACEBACK_BODY = re.compile(r"^(\s|Traceback \(most recent call last\)|[\w.]+(Error|Exception): )")


def library_lines(output: str) -> list[str]:
    """The lines that are neither the project's nor the body of a traceback."""
    lines = []
    for line in output.split("\n"):
        text = RAY_PREFIX.sub("", line)
        if text.strip() and not PROJECT_LINE.search(line) and not TRACEBACK_BODY.match(text):
            lines.append(line)
    return lines


def test_the_train_command_prints_the_project_and_few_library_lines(tmp_path, tiny_shards):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"data.root={tiny_shards}", f"run.root={tmp_path / 'runs'}", "ray.num_cpus=2",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-4000:]
    assert re.search(r"pipeline\.loop: step \d+/\d+ \| test bits/dim", out.stdout), out.stdout[-4000:]
    assert "PlacementGroupCleaner" not in out.stdout
    assert "TrainingReport(" not in out.stdout
    others = library_lines(out.stdout)
    assert len(others) <= MAX_LIBRARY_LINES, "\n".join(others)
