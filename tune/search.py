"""``python -m tune.search --config configs/tune/<name>.yaml [section.key=value ...]``

Searches EIW-Flow's shuffle regularization strength, depth and friends with Ray Tune: each trial is a
Ray Train run of the pipeline (tune/trial.py), ASHA stops poor trials early on test bits/dim, Optuna's
TPE (or a grid, for small ablations) proposes the values. Concurrent trials are bounded by what the
cluster holds: its GPUs (or CPUs) divided by one trial's workers.

MLflow: one parent run per search; every trial's run is nested under it. At the end the parent gets
the results table (``trials.csv``) and plots, and the best completed trial's model is registered under
``mlflow.registered_model_name`` with the alias ``mlflow.alias`` (plus the pipeline's newest/champion
aliases).

Resuming: re-running the same command (same ``run.name`` and ``run.storage_path``) restores the search
with ``Tuner.restore``: finished trials are not re-run, interrupted ones continue from their latest
Ray Train checkpoint and MLflow run, the same parent run is reused, and ASHA's rungs are rebuilt
(tune/asha.py). Ctrl-C (SIGINT) stops a search cleanly, saving its state for that.

``run.storage_path`` may be an object-store URI (``s3://bucket/tune``): Tune's experiment state, the
trials' run roots and Ray Train checkpoints then live in the bucket, which every node reaches with
the credentials and endpoint in its environment (``AWS_*``; Ray's pyarrow filesystem reads them), so
a multi-node search needs no shared POSIX storage, and ``Tuner.can_restore``/``Tuner.restore`` resume
from the bucket (tests/integration/test_object_storage.py, against moto).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from data_prep.storage import RemotePath, as_path
from pipeline.config import TrainConfig, resolve
from pipeline.config_loading import flatten, revise
from pipeline.logging_setup import configure_console
from tune.records import close_stopped_runs, log_results, parent_run, register_best
from tune.report import PLOTTED_FIELDS, TrialRow, make_row, ranked
from tune.spec import SearchSpec, asha_bounds, load_spec

log = logging.getLogger("tune.search")

TRIAL_DRIVER_CPUS = 1.0  # Tune's default for a function trainable: the trial's driver process
VERSION_TAG = "tune.model_version"


@dataclass(kw_only=True)
class SearchOutcome:
    experiment_path: Path | RemotePath
    parent_run_id: str
    rows: list[TrialRow]
    best: TrialRow | None
    model_name: str
    model_version: str | None
    resumed: bool
    interrupted: bool


# ------------------------------------------------------------------------------ Tune pieces
def param_space(spec: SearchSpec) -> dict[str, Any]:
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {key: make[dim.kind](dim.values) for key, dim in spec.space.items()}


def expected_trials(spec: SearchSpec) -> int:
    if spec.search.algorithm == "grid":
        return spec.search.num_samples * math.prod(len(dim.values) for dim in spec.space.values())
    return spec.search.num_samples


def trial_capacity(cfg: TrainConfig, resources: dict[str, float]) -> int:
    """How many trials the cluster holds at once: its GPUs (or CPUs) over one trial's needs."""
    workers = cfg.ray.num_workers
    cpus = workers * cfg.ray.cpus_per_worker + TRIAL_DRIVER_CPUS
    capacity = math.floor(resources.get("CPU", 0) / cpus)
    if cfg.ray.uses_gpu(resources) and cfg.ray.gpus_per_worker > 0:
        capacity = min(capacity, math.floor(resources.get("GPU", 0) / (workers * cfg.ray.gpus_per_worker)))
    return int(capacity)


def concurrency(spec: SearchSpec, cfg: TrainConfig, resources: dict[str, float]) -> int:
    capacity = trial_capacity(cfg, resources)
    wanted = spec.search.max_concurrent_trials
    if capacity < 1:
        log.warning(
            "the cluster (%s) cannot hold one trial (%d workers) now; starting 1 and waiting for resources",
            {k: resources.get(k, 0) for k in ("CPU", "GPU")},
            cfg.ray.num_workers,
        )
        capacity = 1
    if wanted == "auto":
        return min(capacity, expected_trials(spec))
    if wanted > capacity:
        log.warning(
            "search.max_concurrent_trials=%d but the cluster holds %d trials now; extra trials wait",
            wanted,
            capacity,
        )
    return int(wanted)


def trial_dirname(trial: Any) -> str:
    """Tune's trial directory and name: the trial id, no timestamp."""
    return f"trial_id={trial.trial_id}"


def make_tuner(
    spec: SearchSpec, cfg: TrainConfig, trainable: Any, *, max_concurrent: int, callbacks: Sequence[Any] = ()
) -> Any:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tune.asha import TIME_ATTR, ResumableASHA

    scheduler = None
    if spec.scheduler.type == "asha":
        grace, max_t = asha_bounds(cfg, spec.scheduler)
        scheduler = ResumableASHA(
            time_attr=TIME_ATTR,
            grace_period=grace,
            max_t=max_t,
            reduction_factor=spec.scheduler.reduction_factor,
            # A trial's last report is past every rung: it is never stopped there (it must log its model).
            stop_last_trials=False,
        )
    search_alg = None
    if spec.search.algorithm == "optuna":
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric,
            mode=spec.search.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.run.name,
            storage_path=str(storage_root(spec)),
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            callbacks=list(callbacks),
        ),
    )


# ------------------------------------------------------------------------------------ driver
def storage_root(spec: SearchSpec) -> Path | RemotePath:
    """``run.storage_path``: an absolute local path, or the object-store URI as written."""
    return as_path(spec.run.storage_path).resolve()


def base_config(spec: SearchSpec) -> TrainConfig:
    """The resolved base config (absolute paths, a concrete tracking URI) shared by every trial."""
    where = {"mlflow.tracking_uri": spec.mlflow.tracking_uri, "mlflow.experiment": spec.mlflow.experiment}
    return resolve(revise(spec.base, {key: value for key, value in where.items() if value}))


def trial_base(cfg: TrainConfig, path: Path | RemotePath, parent_id: str) -> TrainConfig:
    """What every trial of this search shares; a trial adds its sampled values and name (tune/trial.py)."""
    return revise(
        cfg,
        {
            "run.root": str(path),
            "run.progress_bar": False,
            "mlflow.parent_run_id": parent_id,
            "mlflow.log_model": True,  # the best one is registered by the search, not by each trial
            "mlflow.register": False,
        },
    )


def collect_rows(spec: SearchSpec, cfg: TrainConfig, path: Path | RemotePath) -> list[TrialRow]:
    from ray.tune import ExperimentAnalysis

    from tune.asha import reported_results

    keys = list(dict.fromkeys([*spec.space, *PLOTTED_FIELDS]))
    defaults = flatten(cfg.model_dump())
    analysis = ExperimentAnalysis(str(path))
    return [
        make_row(
            trial_id=trial.trial_id,
            tune_status=trial.status,
            results=reported_results(trial),
            config=trial.config,
            defaults=defaults,
            keys=keys,
            metric=spec.search.metric,
            total_steps=cfg.total_steps,
        )
        for trial in analysis.trials
    ]


def run_search(spec: SearchSpec, *, callbacks: Sequence[Any] = ()) -> SearchOutcome:
    """Start, or resume, the search ``spec`` and record it in MLflow (see the module docstring).

    ``callbacks``: ``ray.tune.Callback`` objects for a new search (Tune pickles them with the
    experiment, so a resumed search keeps the ones it started with).
    """
    import ray
    from ray import tune

    from pipeline.data import ensure_data
    from pipeline.ray_adapter import ray_session
    from pipeline.tracking import artifact_location_for, get_or_create_experiment
    from tune.trial import run_trial

    cfg = base_config(spec)
    path = storage_root(spec) / spec.run.name
    ensure_data(cfg.data, cfg.model.image_shape)  # once, here: neither trials nor workers check it again
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment_id = get_or_create_experiment(
        client, cfg.mlflow.experiment, artifact_location_for(cfg.mlflow.tracking_uri, cfg.run.root)
    )
    with ray_session(cfg):
        resuming = tune.Tuner.can_restore(str(path))
        parent_id = parent_run(client, experiment_id, spec, path, resuming)
        trainable = tune.with_parameters(run_trial, base=trial_base(cfg, path, parent_id))
        if resuming:
            log.info("resuming the search at %s", path)
            tuner = tune.Tuner.restore(str(path), trainable=trainable)
        else:
            max_concurrent = concurrency(spec, cfg, ray.cluster_resources())
            log.info("search %s: up to %d trials at a time, state in %s", spec.run.name, max_concurrent, path)
            tuner = make_tuner(spec, cfg, trainable, max_concurrent=max_concurrent, callbacks=callbacks)
        tuner.fit()

    rows = collect_rows(spec, cfg, path)
    finished = sum(r.status in ("completed", "stopped_early", "error") for r in rows)
    interrupted = finished < expected_trials(spec)
    close_stopped_runs(client, rows)
    best_first = ranked(rows, mode=spec.search.mode)
    best = best_first[0] if best_first else None
    log_results(client, parent_id, rows, best_first)
    version = client.get_run(parent_id).data.tags.get(VERSION_TAG)
    if not interrupted and best is not None and version is None:
        version = register_best(client, spec, cfg, experiment_id, best, parent_id)
        client.set_tag(parent_id, VERSION_TAG, version)
    if best is not None:
        client.log_metric(parent_id, f"best_{spec.search.metric}", best.test_bits_per_dim)
        client.set_tag(parent_id, "tune.best_trial_id", best.trial_id)
        client.set_tag(parent_id, "tune.best_mlflow_run_id", best.mlflow_run_id)
    client.set_terminated(parent_id, status="KILLED" if interrupted else "FINISHED")
    return SearchOutcome(
        experiment_path=path,
        parent_run_id=parent_id,
        rows=rows,
        best=best,
        model_name=spec.mlflow.registered_model_name or cfg.mlflow.registered_model,
        model_version=version,
        resumed=resuming,
        interrupted=interrupted,
    )


# --------------------------------------------------------------------------------------- CLI
EPILOG = """\
overrides: any field of the search file as section.key=value (YAML values); in overrides and space
the key after the section is the dotted config field, e.g.
  run.name=try2 search.num_samples=32 scheduler.reduction_factor=2 overrides.run.epochs=10
  'space.model.num_steps={choice: [4, 8]}'
examples:
  python -m tune.search --config configs/tune/sample.yaml
  python -m tune.search --config configs/tune/tiny.yaml run.storage_path=/tmp/tune
  ray job submit --address http://HEAD:8265 --working-dir . -- python -m tune.search \\
      --config configs/tune/imagenet64.yaml
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tune.search",
        description="Ray Tune search over EIW-Flow's shuffle regularization strength, depth and friends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", required=True, help="search YAML (configs/tune/)")
    parser.add_argument("--check", action="store_true", help="validate the search file and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="search file overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_console()
    try:
        spec = load_spec(args.config, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for key, dim in spec.space.items():
            print(f"{key}: {dim.describe()}")
        print(f"ok: {expected_trials(spec)} trials ({spec.search.algorithm}), state in "
              f"{as_path(spec.run.storage_path) / spec.run.name}")  # fmt: skip
        return 0
    try:
        outcome = run_search(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r.status == s for r in outcome.rows) for s in ("completed", "stopped_early", "error")}
    print(f"trials: {len(outcome.rows)} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    if outcome.best is not None:
        print(f"best: trial {outcome.best.trial_id}, test bits/dim {outcome.best.test_bits_per_dim:.4f}, "
              f"{outcome.best.values}")  # fmt: skip
    print(f"MLflow parent run {outcome.parent_run_id}; state in {outcome.experiment_path}")
    if outcome.interrupted:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    if outcome.model_version:
        print(f"registered {outcome.model_name} v{outcome.model_version} @{spec.mlflow.alias}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
