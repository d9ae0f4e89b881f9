"""The search's MLflow records: the parent run, the results table and plots, the best model.

One parent run per search (found again by its experiment path when resuming, refused if the space,
search or scheduler changed); every trial's run is nested under it by the pipeline's
``mlflow.parent_run_id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import TrainConfig
from pipeline.config_loading import revise
from tune.report import TrialRow, plot_learning_curves, plot_vs_depth, plot_vs_sigma, write_table
from tune.spec import SearchSpec

log = logging.getLogger("tune.search")

SEARCH_TAG = "tune.search"
PATH_TAG = "tune.experiment_path"
SPEC_TAG = "tune.spec_sha256"
NUM_CURVES = 3


def spec_digest(spec: SearchSpec) -> str:
    """What must not change between a search and its resumption (the space, search and scheduler)."""
    text = json.dumps(
        {
            "base_config": spec.base_config,
            "overrides": spec.overrides,
            "space": [dim.describe() + key for key, dim in spec.space.items()],
            "search": spec.search.model_dump(),
            "scheduler": spec.scheduler.model_dump(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def parent_run(client: MlflowClient, experiment_id: str, spec: SearchSpec, path: Path, resuming: bool) -> str:
    """The search's parent run: the one recorded for this experiment path when resuming, else a new one."""
    if resuming:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PATH_TAG}` = '{path}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run = found[0]
            if run.data.tags.get(SPEC_TAG) != spec_digest(spec):
                raise ValueError(
                    f"run.name: the search at {path} was started with a different space/search/scheduler; "
                    "restore that file or pick a new run.name"
                )
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("continuing parent MLflow run %s", run.info.run_id)
            return run.info.run_id
    run = client.create_run(
        experiment_id,
        run_name=spec.run.name,
        tags={SEARCH_TAG: spec.run.name, PATH_TAG: str(path), SPEC_TAG: spec_digest(spec)},
    )
    run_id = run.info.run_id
    params = {
        "base_config": spec.base_config,
        **{f"overrides.{k}": v for k, v in spec.overrides.items()},
        **{f"space.{key}": dim.describe() for key, dim in spec.space.items()},
        **{f"search.{k}": v for k, v in spec.search.model_dump().items()},
        **{f"scheduler.{k}": v for k, v in spec.scheduler.model_dump().items()},
    }
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:6000])
    log.info("started parent MLflow run %s (%s)", run_id, spec.run.name)
    return run_id


def register_best(
    client: MlflowClient,
    spec: SearchSpec,
    cfg: TrainConfig,
    experiment_id: str,
    best: TrialRow,
    parent_id: str,
) -> str:
    """Register the best trial's logged model; set the search's alias on it. Returns the version."""
    from pipeline.registry import register

    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{best.mlflow_run_id}'"
    )
    if not models:
        raise RuntimeError(f"trial {best.trial_id}: its MLflow run {best.mlflow_run_id} has no logged model")
    name = spec.mlflow.registered_model_name or cfg.mlflow.registered_model
    mlflow_cfg = revise(cfg.mlflow, {"registered_model": name})
    version = register(
        models[0].model_uri, cfg=mlflow_cfg, test_bpd=best.test_bits_per_dim, run_id=best.mlflow_run_id
    )
    client.set_registered_model_alias(name, spec.mlflow.alias, version.version)
    for key, value in (
        (SEARCH_TAG, spec.run.name),
        ("tune.trial_id", best.trial_id),
        ("tune.parent_run_id", parent_id),
    ):
        client.set_model_version_tag(name, version.version, key, value)
    log.info("registered %s v%s as @%s (trial %s)", name, version.version, spec.mlflow.alias, best.trial_id)
    return str(version.version)


def close_stopped_runs(client: MlflowClient, rows: list[TrialRow]) -> None:
    """ASHA ends a trial by killing its actors, so its MLflow run is left RUNNING: mark it KILLED."""
    for row in rows:
        if row.status != "stopped_early" or not row.mlflow_run_id:
            continue
        run = client.get_run(row.mlflow_run_id)
        client.set_tag(row.mlflow_run_id, "tune.stopped_early_at_step", str(row.step))
        if run.info.status == "RUNNING":
            client.set_terminated(row.mlflow_run_id, status="KILLED")


def log_results(
    client: MlflowClient, parent_id: str, rows: list[TrialRow], best_first: list[TrialRow]
) -> None:
    curves = {}
    for row in best_first[:NUM_CURVES]:
        history = client.get_metric_history(row.mlflow_run_id, "test/bits_per_dim")
        label = f"{row.trial_id} ({row.test_bits_per_dim:.3f})"
        curves[label] = sorted((m.step, m.value) for m in history)
    with tempfile.TemporaryDirectory(prefix="tune-report-") as tmp:
        out = Path(tmp)
        for path in (
            write_table(rows, out / "trials.csv"),
            plot_vs_sigma(rows, out / "bpd_vs_sigma.png"),
            plot_vs_depth(rows, out / "bpd_vs_depth.png"),
            plot_learning_curves(curves, out / "learning_curves.png"),
        ):
            client.log_artifact(parent_id, str(path))
