"""MLflow run tracking from rank 0 (every other rank holds an inactive ``Tracker`` whose calls do nothing).

Resuming: the run id travels in the checkpoint; ``start(run_id=...)`` reopens that run. Metrics are
buffered and written only after the checkpoint that covers their steps is durable (``flush``), so a
crash loses at most the unflushed tail, which the resumed run then logs once.

One window remains: under Ray Train a node can die after a worker's ``ray.train.report`` returned
(so rank 0 flushed) but before the controller registered that checkpoint; the restart then resumes
from the checkpoint before and recomputes steps that MLflow already holds. So a reopened run first
reads how far each metric was logged, and ``flush`` drops anything at or below that step: every step
is logged exactly once, and in that rare case the few overlapping steps keep their first values.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.config import MlflowConfig

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
RUN_NAME_TAG = "pipeline.run_name"


def artifact_location_for(tracking_uri: str, run_root: str | Path) -> str | None:
    """Where a new experiment keeps artifacts: ``run_root/mlartifacts`` for a local sqlite store
    (MLflow's default is relative to whatever the current directory is); the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return (Path(run_root) / "mlartifacts").resolve().as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class Tracker:
    def __init__(self, cfg: MlflowConfig, *, active: bool, run_root: str | Path) -> None:
        self.cfg = cfg
        self.active = active
        self.run_root = Path(run_root)
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        self._client: MlflowClient | None = None
        self._logged_through: dict[str, int] = {}  # metric key -> last step already in MLflow

    @property
    def client(self) -> MlflowClient:
        assert self._client is not None, "Tracker.start first"
        return self._client

    def start(
        self, *, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> None:
        """Open (or reopen) the MLflow run and log the params that it does not have yet."""
        if not self.active:
            return
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self._client = MlflowClient(self.cfg.tracking_uri)
        if mlflow.active_run() is not None:
            mlflow.end_run()  # a run left open in this process by an earlier fit
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
            log.info("continuing MLflow run %s (%s)", run_id, run_name)
            self._logged_through = {
                key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                for key in self.client.get_run(run_id).data.metrics
            }
        else:
            experiment_id = get_or_create_experiment(
                self.client, self.cfg.experiment, artifact_location_for(self.cfg.tracking_uri, self.run_root)
            )
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
            log.info("started MLflow run %s (%s)", run.info.run_id, run_name)
        self.run_id = run.info.run_id
        existing = self.client.get_run(self.run_id).data.params
        new = {k: str(v) for k, v in params.items() if k not in existing}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != str(v))
        if changed:
            # MLflow params are immutable; a resumed run with a changed config keeps the first values.
            log.warning("resumed with changed config keys (MLflow keeps the first values): %s", changed)
            mlflow.set_tag("pipeline.changed_on_resume", ",".join(changed)[:5000])
        items = list(new.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        if self.cfg.parent_run_id:
            tags = {MLFLOW_PARENT_RUN_ID: self.cfg.parent_run_id, **tags}
        mlflow.set_tags({RUN_NAME_TAG: run_name, **tags})

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer metrics for ``step``; written by the next ``flush``."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(v), now, int(step)) for key, v in metrics.items())

    def flush(self) -> None:
        if not self.active or not self._pending:
            return
        fresh = [m for m in self._pending if m.step > self._logged_through.get(m.key, -1)]
        if len(fresh) < len(self._pending):
            log.info(
                "%d metric values at steps MLflow already holds were not logged again",
                len(self._pending) - len(fresh),
            )
        for i in range(0, len(fresh), BATCH):
            self.client.log_batch(self.run_id, metrics=fresh[i : i + BATCH])
        self._pending.clear()

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        if not self.active:
            return
        for p in paths:
            if Path(p).is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id is not None:
            mlflow.set_tags(tags)

    def get_tag(self, key: str) -> str | None:
        if not self.active:
            return None
        return self.client.get_run(self.run_id).data.tags.get(key)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run. Unflushed metrics are dropped: no checkpoint covers them, and the resumed
        run will log those steps itself."""
        if not self.active or self.run_id is None:
            return
        self._pending.clear()
        mlflow.end_run(status=status)
