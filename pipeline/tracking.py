"""MLflow run tracking from rank 0 (every other rank holds an inactive ``Tracker`` whose calls do nothing).

Live: ``log_metrics`` hands each log step's metrics to MLflow's asynchronous logging
(``log_batch(..., synchronous=False)``: a queue drained by MLflow's worker threads), so the training
step does not wait for the server; ``wait`` (at checkpoints and at the end) collects the outcome and
warns about values the server refused. System metrics (CPU, memory, disk, network, and GPU through
NVML when there is one) come from MLflow's monitor, started through its public API on every node,
keyed ``system/node_<i>/...`` (pipeline/system_metrics.py).

Exactly once: the run id travels in the checkpoint; ``start(run_id=...)`` reopens that run and first
reads which steps each metric already holds (and which sample images), and those are never logged
again. A restart recomputes the steps after its checkpoint; whatever of them the lost attempt had
already sent keeps its first value, and the rest is logged by the resumed run. Nothing waits for a
checkpoint any more, so a crash loses at most the values still in the queue, which the resumed run
then logs. Where the recomputation is deterministic (restored RNG states, replayed data order) the
kept and the recomputed values agree.

The split order (``FlowModel.kept_shares()`` per log step) is kept in an ``OrderHistory``; the run
artifact ``order/kept_share.npz`` (rewritten at each checkpoint) carries it across restarts and
``order/kept_share.png`` draws it at the end (pipeline/order_picture.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import Tensor

from data_prep.storage import RemotePath, as_path
from pipeline.config import MlflowConfig
from pipeline.order_picture import ARTIFACT_DIR, DATA_NAME, PICTURE_NAME, OrderHistory
from pipeline.system_metrics import (
    NodeSystemMetrics,
    active_experiment_lifted,
    logs_this_node,
    monitor_settings,
    node_id,
)

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
RUN_NAME_TAG = "pipeline.run_name"
PREVIOUS_RUN_TAG = "pipeline.previous_run_id"  # mlflow.on_missing_run=new: the run the checkpoint named
SYSTEM_PREFIX = "system/"  # MLflow's system metrics: stepped by their own monitor, not by us
# log_image's files: images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>[+compressed].<ext>
# (older MLflow versions used % and #).
_IMAGE_FILE = re.compile(r"^images/(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")


def artifact_location_for(tracking_uri: str, run_root: str | Path) -> str | None:
    """Where a new experiment keeps artifacts: ``run_root/mlartifacts`` for a local sqlite store
    (MLflow's default is relative to whatever the current directory is); the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:") or "://" not in tracking_uri:
        root = as_path(run_root)
        if isinstance(root, RemotePath):  # s3://bucket/prefix/mlartifacts: the client writes there itself
            return str(root / "mlartifacts")
        return (root / "mlartifacts").resolve().as_uri()
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


def image_key_and_step(path: str) -> tuple[str, int] | None:
    """(key, step) of a file ``MlflowClient.log_image(key=..., step=...)`` wrote, else None."""
    match = _IMAGE_FILE.match(path)
    if match is None:
        return None
    return match["key"].replace("~", "/").replace("#", "/"), int(match["step"])


@contextlib.contextmanager
def multipart_uploads(tracking_uri: str) -> Iterator[None]:
    """Large files through a tracking server's artifact proxy go up in parts (MLflow's
    ``MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD``; files from ``MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE``,
    500 MiB by default). A server whose artifact store has no multipart API answers so, and MLflow
    falls back to one PUT. Not for local stores; a value the user set wins."""
    key = "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"
    if not tracking_uri.startswith(("http://", "https://")) or key in os.environ:
        yield
        return
    os.environ[key] = "true"
    try:
        yield
    finally:
        os.environ.pop(key, None)


class Tracker:
    def __init__(self, cfg: MlflowConfig, *, active: bool, run_root: str | Path) -> None:
        self.cfg = cfg
        self.active = active
        self.run_root = as_path(run_root)
        self.run_id: str | None = None
        self.order = OrderHistory()
        self._client: MlflowClient | None = None
        self._held: dict[str, set[int]] = {}  # metric key -> steps MLflow holds from earlier attempts
        self._held_images: set[tuple[str, int]] = set()
        self._pending: list[Any] = []  # RunOperations of asynchronous log_batch calls
        self._node_metrics: NodeSystemMetrics | None = None  # another node's leader: its own metrics

    @property
    def client(self) -> MlflowClient:
        assert self._client is not None, "Tracker.start first"
        return self._client

    def start(
        self,
        *,
        run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        resumed_from: int | None = None,
    ) -> None:
        """Open (or reopen) the MLflow run, log the params that it does not have yet, start the
        system metrics monitor. ``resumed_from``: the checkpoint's step when resuming."""
        if not self.active:
            return
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self._client = MlflowClient(self.cfg.tracking_uri)
        if mlflow.active_run() is not None:
            mlflow.end_run()  # a run left open in this process by an earlier fit
        if run_id is not None and not self._run_exists(run_id):
            if self.cfg.on_missing_run != "new":
                raise ValueError(
                    f"the checkpoint of run {run_name!r} continues MLflow run {run_id}, which the tracking "
                    f"server at {self.cfg.tracking_uri} does not have (another server, or a reset "
                    f"database?). Either train under a new run.name (starts over), or pass "
                    f"mlflow.on_missing_run=new to keep the checkpoint's progress in a new MLflow run "
                    f"tagged {PREVIOUS_RUN_TAG}={run_id}"
                )
            log.warning("MLflow run %s is not on %s: starting a new one", run_id, self.cfg.tracking_uri)
            tags = {**tags, PREVIOUS_RUN_TAG: run_id}
            run_id = None
        # MLflow's monitor starts with the run (and stops with ``end_run``) when system metrics are on.
        system = monitor_settings(node=node_id(), interval_s=self.cfg.system_metrics_interval_s)
        if run_id is not None:
            with active_experiment_lifted(), system:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=self.cfg.system_metrics)
            log.info("continuing MLflow run %s (%s)", run_id, run_name)
            self._read_held(run_id, resumed_from)
        else:
            experiment_id = get_or_create_experiment(
                self.client, self.cfg.experiment, artifact_location_for(self.cfg.tracking_uri, self.run_root)
            )
            with system:
                run = mlflow.start_run(
                    experiment_id=experiment_id, run_name=run_name, log_system_metrics=self.cfg.system_metrics
                )
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

    def follow_node_metrics(self, run_id: str | None) -> None:
        """On every node but rank 0's, the node's local rank 0 logs that node's system metrics into
        ``run_id`` (rank 0's run, shared by a collective) until ``end``; other processes do nothing."""
        if self.active or run_id is None or not self.cfg.system_metrics or not logs_this_node():
            return
        self._node_metrics = NodeSystemMetrics(self.cfg.tracking_uri, self.cfg.system_metrics_interval_s)
        self._node_metrics.start(run_id)

    def _run_exists(self, run_id: str) -> bool:
        """Whether the tracking server has ``run_id`` (False only when it says it does not exist;
        any other failure, an unreachable server, propagates)."""
        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise
        return True

    def _read_held(self, run_id: str, resumed_from: int | None) -> None:
        """What earlier attempts of this run already logged: metric steps, images, the order history."""
        for key in self.client.get_run(run_id).data.metrics:
            if not key.startswith(SYSTEM_PREFIX):
                self._held[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        for info in self.client.list_artifacts(run_id, "images"):
            if (found := image_key_and_step(info.path)) is not None:
                self._held_images.add(found)
        saved = f"{ARTIFACT_DIR}/{DATA_NAME}"
        if any(i.path == saved for i in self.client.list_artifacts(run_id, ARTIFACT_DIR)):
            with tempfile.TemporaryDirectory(prefix="eiw-order-") as tmp:
                path = self.client.download_artifacts(run_id, saved, tmp)
                self.order = OrderHistory.from_npz(path)
            if resumed_from is not None:
                self.order.truncate(resumed_from)

    # ----------------------------------------------------------------------------- live logging
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at ``step`` now (asynchronously unless ``mlflow.async_metrics: false``),
        leaving out the keys whose ``step`` an earlier attempt of this run already logged."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        fresh = [
            Metric(key, float(v), now, int(step))
            for key, v in metrics.items()
            if int(step) not in self._held.get(key, ())
        ]
        if len(fresh) < len(metrics):
            skipped = len(metrics) - len(fresh)
            log.info("step %d: %d values MLflow already holds were not logged again", step, skipped)
        synchronous = not self.cfg.async_metrics
        for i in range(0, len(fresh), BATCH):
            chunk = fresh[i : i + BATCH]
            operation = self.client.log_batch(self.run_id, metrics=chunk, synchronous=synchronous)
            if operation is not None:
                self._pending.append(operation)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """``mlflow``'s stepped images (the UI's image slider), one per key; a (key, step) the run
        already holds is not logged again. Synchronous: these come with evaluations, which are slow."""
        if not self.active:
            return
        for key, image in images.items():
            if (key, int(step)) in self._held_images:
                continue
            self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)
            self._held_images.add((key, int(step)))

    def log_datasets(self, datasets: dict[str, Dataset]) -> None:
        """``mlflow.log_input`` for each ``{context: dataset}`` (MLflow keeps one input per name and
        digest, so a resumed run on the same shards adds nothing)."""
        if not self.active:
            return
        for context, dataset in datasets.items():
            mlflow.log_input(dataset, context=context)

    def wait(self) -> None:
        """Block until every asynchronous value so far is in MLflow; failures become warnings (the
        values are lost, training goes on)."""
        pending, self._pending = self._pending, []
        for operation in pending:
            try:
                operation.wait()
            except MlflowException as e:
                log.warning("MLflow did not take some metric values: %s", e)

    # ---------------------------------------------------------------------------- split order
    def record_order(self, step: int, shares: Sequence[Tensor]) -> None:
        """Keep ``FlowModel.kept_shares()`` at ``step`` (nothing for a flow without splits)."""
        if self.active:
            self.order.record(step, shares)

    def save_order(self) -> None:
        """Rewrite ``order/kept_share.npz`` (at checkpoints: a restart reads it back)."""
        if not self.active or not len(self.order):
            return
        with tempfile.TemporaryDirectory(prefix="eiw-order-") as tmp:
            path = Path(tmp) / DATA_NAME
            path.write_bytes(self.order.to_npz())
            self.client.log_artifact(self.run_id, str(path), ARTIFACT_DIR)

    def log_order_picture(self, *, title: str) -> None:
        """``order/kept_share.png`` and its data; nothing for a flow without splits."""
        if not self.active or not len(self.order):
            return
        self.save_order()
        with tempfile.TemporaryDirectory(prefix="eiw-order-") as tmp:
            picture = self.order.render(Path(tmp) / PICTURE_NAME, title=title)
            self.client.log_artifact(self.run_id, str(picture), ARTIFACT_DIR)

    # -------------------------------------------------------------------------------- the rest
    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        if not self.active:
            return
        for p in paths:
            if Path(p).is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_large_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """``log_artifacts`` with multipart uploads through a server's artifact proxy."""
        with multipart_uploads(self.cfg.tracking_uri):
            self.log_artifacts(paths, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id is not None:
            mlflow.set_tags(tags)

    def get_tag(self, key: str) -> str | None:
        if not self.active:
            return None
        return self.client.get_run(self.run_id).data.tags.get(key)

    def end(self, status: str = "FINISHED") -> None:
        """Wait for the queued values, close the run (which stops MLflow's system metrics monitor)."""
        if self._node_metrics is not None:
            self._node_metrics.end(status)
            self._node_metrics = None
        if not self.active or self.run_id is None:
            return
        self.wait()
        mlflow.end_run(status=status)
