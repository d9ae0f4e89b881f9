"""What a run prints: the project's log lines, and only the libraries' lines a user can act on.

One setup for every process that logs (the ``pipeline.train`` / ``tune.search`` / ``pipeline.compare``
drivers and each Ray Train worker), through the libraries' own logging controls, not by filtering
text (issue 22):

- the root logger at WARNING, the project's packages at INFO: third-party INFO chatter that reaches
  the root logger stays out, for instance Ray Train's "Reporting training result N:
  TrainingReport(...)" dump of every report (``ray/train/v2/_internal/execution/context.py`` logs it
  at INFO under a logger named after its file, so it propagates to the root);
- MLflow's own logger (it has its own handler, INFO by default) at WARNING: no "Creating initial
  MLflow database tables", "Started monitoring system metrics", ... on every run; and no artifact
  download progress bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``, read when a download starts);
- Ray Train's controller and workers at WARNING (``TRAIN_LOGGING``, given to the Train
  ``RunConfig``): no resource-request and worker-group listings on every start; its warnings and
  errors (a failed worker, a restart) still show.

What remains from the libraries on the quick start: Ray's "Started a local Ray instance" and its
token-authentication notice, and MLflow's two registry lines ("Successfully registered model",
"Created version"), which MLflow prints without a logger. ``tests/integration/test_quiet_console.py``
counts them.
"""

from __future__ import annotations

import logging
import os

PROJECT_LOGGERS = ("pipeline", "flows", "data_prep", "tune")
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
# MLflow reads the level when it is imported (a process that imports it after this call).
LIBRARY_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}
TRAIN_LOG_LEVEL = "WARNING"


def configure_console(*, force: bool = False) -> None:
    """Root at WARNING, the project at INFO, MLflow at WARNING (module doc). ``force``: replace the
    root handlers another library installed first (a Ray worker has Ray's)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, force=force)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for key, value in LIBRARY_ENV.items():
        os.environ.setdefault(key, value)  # the user's own setting wins


def train_logging_config():  # -> ray.train.LoggingConfig (imported here: this module needs no Ray)
    """Ray Train's controller and worker logs at ``TRAIN_LOG_LEVEL`` (for ``RunConfig(logging_config=)``)."""
    import ray.train

    return ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL)
