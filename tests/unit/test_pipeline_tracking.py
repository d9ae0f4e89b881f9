"""pipeline.tracking: a reopened run never logs a step twice, even when the restart recomputes it."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import MlflowConfig
from pipeline.tracking import Tracker


def test_reopened_run_skips_steps_mlflow_already_holds(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MlflowConfig(tracking_uri=uri, experiment="tracking-test")
    first = Tracker(cfg, active=True, run_root=tmp_path)
    first.start(run_id=None, run_name="r", params={"a": 1}, tags={})
    for step in range(1, 5):
        first.record(step, {"train/bits_per_dim": 10.0 - step})
    first.flush()  # steps 1-4 are in MLflow; the "crash" comes before the checkpoint at 4 counts
    first.end("FAILED")

    # The restart resumes from the checkpoint at step 2 and recomputes steps 3 and 4.
    second = Tracker(cfg, active=True, run_root=tmp_path)
    second.start(run_id=first.run_id, run_name="r", params={"a": 1}, tags={})
    for step in range(3, 7):
        second.record(step, {"train/bits_per_dim": 20.0 + step, "test/bits_per_dim": 5.0})
    second.flush()
    second.end()

    history = MlflowClient(uri).get_metric_history(first.run_id, "train/bits_per_dim")
    by_step = {m.step: m.value for m in history}
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert by_step[3] == 7.0 and by_step[4] == 6.0, "overlapping steps keep their first values"
    assert by_step[5] == 25.0
    # A metric the first attempt never logged is logged in full.
    assert [m.step for m in MlflowClient(uri).get_metric_history(first.run_id, "test/bits_per_dim")] == [
        3,
        4,
        5,
        6,
    ]
