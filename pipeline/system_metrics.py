"""System metrics (CPU, memory, disk, network; GPUs through NVML) from every node of a run, through
MLflow's public API: ``mlflow.start_run(..., log_system_metrics=True)`` starts MLflow's monitor for
the run, ``mlflow.end_run`` stops it, and ``mlflow.system_metrics.set_system_metrics_node_id`` /
``set_system_metrics_sampling_interval`` say how the monitor names and samples.

One process per node logs that node's metrics: the node's local rank 0 (``LOCAL_RANK``, which Ray
Train and torchrun set on every worker; a process without it is alone on its node). Its keys carry
the node: ``system/node_<NODE_RANK>/cpu_utilization_percentage`` (MLflow's node-id prefix), so the
nodes of a multi-node run sit side by side in one MLflow run. Rank 0 (node 0) logs from its
``Tracker``; the other nodes' local rank 0 reopen the same run for its monitor only
(``NodeSystemMetrics``) and close it with the status every rank reaches at the end of training.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

import mlflow
import mlflow.system_metrics
from mlflow.environment_variables import (
    MLFLOW_SYSTEM_METRICS_NODE_ID,
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
)
from mlflow.tracking import fluent as mlflow_fluent

log = logging.getLogger(__name__)


def node_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's node in the job (``NODE_RANK``; 0 for a process without one)."""
    return int(env.get("NODE_RANK", "0") or 0)


def logs_this_node(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the one that logs its node's system metrics: the node's local rank 0."""
    return int(env.get("LOCAL_RANK", "0") or 0) == 0


def node_id(env: Mapping[str, str] = os.environ) -> str:
    """MLflow's node id for this process's node: its metrics are ``system/<node_id>/...``."""
    return f"node_{node_rank(env)}"


@contextlib.contextmanager
def monitor_settings(*, node: str, interval_s: float) -> Iterator[None]:
    """Set the node id and the sampling interval MLflow's monitor reads when ``start_run`` creates it,
    then put the process's settings back (they are environment variables). An interval already in
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins over ``interval_s``."""
    held = {
        var: os.environ.get(var.name)
        for var in (MLFLOW_SYSTEM_METRICS_NODE_ID, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)
    }
    mlflow.system_metrics.set_system_metrics_node_id(node)
    if held[MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL] is None:
        mlflow.system_metrics.set_system_metrics_sampling_interval(interval_s)
    try:
        yield
    finally:
        for var, value in held.items():
            if value is None:
                os.environ.pop(var.name, None)
            else:
                os.environ[var.name] = value


# Here rather than in tracking.py, which imports this module: both open runs by id.
@contextlib.contextmanager
def active_experiment_lifted() -> Iterator[None]:
    """MLflow refuses ``start_run(run_id=...)`` for a run outside the experiment that
    ``mlflow.set_experiment`` made active in this process (a notebook's, an earlier job's), although
    the run id already names its experiment. Lift that one check for the call and put the caller's
    choice back; the MLFLOW_EXPERIMENT_ID environment variable (which Ray and Tune pass on) is left
    alone. ``_active_experiment_id`` is MLflow's module state (mlflow/tracking/fluent.py, 3.x)."""
    held = getattr(mlflow_fluent, "_active_experiment_id", None)
    mlflow_fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow_fluent._active_experiment_id = held


class NodeSystemMetrics:
    """This node's system metrics into rank 0's MLflow run, from a process that is not rank 0."""

    def __init__(self, tracking_uri: str, interval_s: float) -> None:
        self.tracking_uri = tracking_uri
        self.interval_s = interval_s
        self.run_id: str | None = None

    def start(self, run_id: str) -> None:
        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            if mlflow.active_run() is not None:
                mlflow.end_run()
            with monitor_settings(node=node_id(), interval_s=self.interval_s), active_experiment_lifted():
                mlflow.start_run(run_id=run_id, log_system_metrics=True)
            self.run_id = run_id
        except Exception as e:  # noqa: BLE001 - monitoring must never stop training
            log.warning("system metrics of %s not logged: %s", node_id(), e)

    def end(self, status: str) -> None:
        """Stop the monitor. The status is the one rank 0 sets too (all ranks end the same way), so
        whichever process closes the run last leaves it right."""
        if self.run_id is not None:
            mlflow.end_run(status=status)
            self.run_id = None
