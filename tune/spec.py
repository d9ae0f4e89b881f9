"""A search, as a YAML file: the base experiment, what every trial overrides, the space, the search.

    base_config: configs/tiny.yaml          # a pipeline experiment (relative to the current directory)
    overrides: {run.epochs: 4}              # dotted TrainConfig keys applied to every trial
    space:                                  # dotted TrainConfig keys -> one domain each
      model.split.sigma: {loguniform: [1.0e-4, 1.0e-1]}
      model.num_steps: {choice: [2, 4]}
      optim.lr: {grid: [3.0e-3, 1.0e-3]}    # grid only with search.algorithm: grid
    search: {algorithm: optuna, num_samples: 16, metric: test_bits_per_dim, mode: min,
             max_concurrent_trials: auto, seed: 0, max_failures: 1}
    scheduler: {type: asha, grace_period: 0, max_t: 0, reduction_factor: 3}
    run: {name: my-search, storage_path: runs/tune}
    mlflow: {tracking_uri: "", experiment: "", registered_model_name: "", alias: tuned}

Domains: ``loguniform: [low, high]`` and ``uniform: [low, high]`` (floats), ``randint: [low, high]``
(integers, high exclusive, Tune's convention), ``choice: [...]`` and ``grid: [...]``. Every value a
dimension can take is applied to the base config and type-checked before anything starts, so a typo
or an impossible value is a ``ValueError`` naming the dotted field (``space.model.split.sigma: ...``).

ASHA works in training steps (``time_attr="step"``, the step Ray Train reports with each checkpoint).
Tune only sees test bits/dim at checkpoints, so the checkpoint cadence must coincide with evaluations.
The last report of a trial is never a rung: a trial that gets there finishes and logs its model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig, config_from_dict, config_to_dict, load_config, read_yaml_file

DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
ALGORITHMS = ("optuna", "grid")
SCHEDULERS = ("asha", "none")
METRICS = ("test_bits_per_dim",)  # what pipeline/loop.py reports with every checkpoint
MODES = ("min", "max")
SECTIONS = ("base_config", "overrides", "space", "search", "scheduler", "run", "mlflow")
# Fixed for the whole search: the step budget and report cadence (ASHA's clock), the resources
# (the concurrency is planned from them), and where things go (set per trial by the search).
FIXED_PREFIXES = ("run.", "mlflow.", "ray.")
FIXED_KEYS = ("data.batches_per_epoch",)
SET_BY_SEARCH = (
    "run.name",
    "run.root",
    "mlflow.tracking_uri",
    "mlflow.experiment",
    "mlflow.parent_run_id",
    "mlflow.register",
    "mlflow.log_model",
)


@dataclass(frozen=True, kw_only=True)
class Dimension:
    """One searched TrainConfig field: ``key`` (dotted), ``kind`` (one of DOMAINS), its ``values``."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass(kw_only=True)
class SearchSection:
    algorithm: str = "optuna"
    num_samples: int = 8  # optuna: trials; grid: repeats of the whole grid
    metric: str = "test_bits_per_dim"
    mode: str = "min"
    max_concurrent_trials: int | str = "auto"
    seed: int = 0
    max_failures: int = 1  # Tune retries of a whole trial (Ray Train retries workers itself)


@dataclass(kw_only=True)
class SchedulerSection:
    type: str = "asha"
    grace_period: int = 0  # steps; 0 = the first report
    max_t: int = 0  # steps; 0 = the last report before the end
    reduction_factor: float = 3.0


@dataclass(kw_only=True)
class RunSection:
    name: str
    storage_path: str = "runs/tune"


@dataclass(kw_only=True)
class MlflowSection:
    tracking_uri: str = ""  # empty: the base config's (then $MLFLOW_TRACKING_URI, then run.root's sqlite)
    experiment: str = ""  # empty: the base config's
    registered_model_name: str = ""  # empty: the base config's mlflow.registered_model
    alias: str = "tuned"


@dataclass(kw_only=True)
class SearchSpec:
    base_config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    space: tuple[Dimension, ...] = ()
    search: SearchSection = field(default_factory=SearchSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    run: RunSection
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def base_dict(self) -> dict[str, Any]:
        """The base config with the overrides applied, as a plain nested dict (every trial starts here)."""
        data = config_to_dict(load_config(self.base_config))
        for key, value in self.overrides.items():
            set_dotted(data, key, value)
        return data

    def trial_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        data = self.base_dict()
        for key, value in values.items():
            set_dotted(data, key, value)
        return data

    @property
    def experiment_path(self) -> Path:
        return Path(self.run.storage_path) / self.run.name


# -------------------------------------------------------------------------------------- helpers
def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "model.split.sigma", 1e-3)``; the typed load later rejects unknown fields."""
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[last] = value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _fields(cls: type, data: dict[str, Any], where: str) -> Any:
    """Strict keyword load with the section name in the message."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from e


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_key(key: Any, where: str) -> str:
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not p.isidentifier() for p in parts):
        raise ValueError(f"{where}.{key}: expected a dotted config field such as model.split.sigma")
    return key


def _check_applies(base: dict[str, Any], key: str, value: Any, where: str) -> TrainConfig:
    data = _deep_copy(base)
    try:
        set_dotted(data, key, value)
        return config_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: {value!r} is not a valid {key} ({e})") from e


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _parse_dimension(key: str, raw: Any, base: dict[str, Any]) -> Dimension:
    where = f"space.{key}"
    if key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS:
        raise ValueError(
            f"{where}: run.*, mlflow.*, ray.* and data.batches_per_epoch are fixed for the whole search "
            "(step budget, report cadence, resources); set them in overrides"
        )
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"{where}: expected one domain, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}; got {raw!r}")
    ((kind, values),) = raw.items()
    if kind not in DOMAINS:
        raise ValueError(f"{where}: unknown domain {kind!r}; choose one of {DOMAINS}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {kind} needs a non-empty list")
    if kind in ("loguniform", "uniform", "randint"):
        if len(values) != 2 or not all(_is_number(v) for v in values):
            raise ValueError(f"{where}: {kind} needs two numeric bounds [low, high], got {values!r}")
        low, high = values
        if kind == "loguniform" and not (low > 0 and high > 0):
            raise ValueError(f"{where}: loguniform needs two positive bounds, got {values!r}")
        if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ValueError(f"{where}: randint needs integer bounds, got {values!r}")
        if not low < high:
            raise ValueError(f"{where}: {kind} needs low < high, got {values!r}")
        values = [float(low), float(high)] if kind != "randint" else [low, high]
        candidates = values if kind != "randint" else [low, high - 1]
    else:
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"{where}: {kind} lists a value twice: {values!r}")
        candidates = values
    for value in candidates:
        _check_applies(base, key, value, where)
    return Dimension(key=key, kind=kind, values=tuple(values))


# -------------------------------------------------------------------------------------- loading
def spec_from_dict(data: dict[str, Any], *, source: str = "search spec") -> SearchSpec:
    """Validate every section and every field (see the module docstring); ValueError names the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
    base_config = data.get("base_config")
    if not isinstance(base_config, str) or not base_config:
        raise ValueError("base_config: required, the path of a pipeline experiment YAML")
    if not Path(base_config).is_file():
        raise ValueError(f"base_config: no such file {base_config!r} (relative to {os.getcwd()})")
    try:
        base = config_to_dict(load_config(base_config))
    except ValueError as e:
        raise ValueError(f"base_config: {e}") from e

    overrides = _mapping(data.get("overrides"), "overrides")
    for key, value in overrides.items():
        _check_key(key, "overrides")
        if key in SET_BY_SEARCH:
            raise ValueError(f"overrides.{key}: set by the search for each trial; leave it out")
        cfg = _check_applies(base, key, value, f"overrides.{key}")
        base = config_to_dict(cfg)
    cfg = config_from_dict(base)

    space_raw = _mapping(data.get("space"), "space")
    if not space_raw:
        raise ValueError("space: needs at least one dimension")
    space = tuple(_parse_dimension(_check_key(k, "space"), v, base) for k, v in space_raw.items())

    search = _fields(SearchSection, _mapping(data.get("search"), "search"), "search")
    scheduler = _fields(SchedulerSection, _mapping(data.get("scheduler"), "scheduler"), "scheduler")
    run = _fields(RunSection, _mapping(data.get("run"), "run"), "run")
    mlflow_section = _fields(MlflowSection, _mapping(data.get("mlflow"), "mlflow"), "mlflow")
    _check_search(search, space)
    _check_cadence(cfg, scheduler)
    _check_run(run)
    _check_mlflow(mlflow_section)
    return SearchSpec(
        base_config=base_config,
        overrides=dict(overrides),
        space=space,
        search=search,
        scheduler=scheduler,
        run=run,
        mlflow=mlflow_section,
    )


def _check_search(search: SearchSection, space: tuple[Dimension, ...]) -> None:
    if search.algorithm not in ALGORITHMS:
        raise ValueError(f"search.algorithm: unknown {search.algorithm!r}; choose one of {ALGORITHMS}")
    for dim in space:
        if search.algorithm == "grid" and dim.kind != "grid":
            raise ValueError(
                f"space.{dim.key}: search.algorithm grid needs grid: [...] in every dimension, got {dim.kind}"
            )
        if search.algorithm == "optuna" and dim.kind == "grid":
            raise ValueError(f"space.{dim.key}: grid needs search.algorithm: grid (Optuna: use choice)")
    if not isinstance(search.num_samples, int) or search.num_samples < 1:
        raise ValueError(f"search.num_samples: must be an integer >= 1, got {search.num_samples!r}")
    if search.metric not in METRICS:
        raise ValueError(f"search.metric: {search.metric!r} is not reported; choose one of {METRICS}")
    if search.mode not in MODES:
        raise ValueError(f"search.mode: unknown {search.mode!r}; choose one of {MODES}")
    limit = search.max_concurrent_trials
    if limit != "auto" and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"search.max_concurrent_trials: expected auto or an integer >= 1, got {limit!r}")
    if not isinstance(search.seed, int):
        raise ValueError(f"search.seed: expected an integer, got {search.seed!r}")
    if not isinstance(search.max_failures, int) or search.max_failures < -1:
        raise ValueError(f"search.max_failures: an integer >= -1 (-1 = forever), got {search.max_failures!r}")


def report_interval(cfg: TrainConfig) -> int:
    """Steps between two reports to Tune (every checkpoint)."""
    return cfg.run.checkpoint_every


def asha_bounds(cfg: TrainConfig, scheduler: SchedulerSection) -> tuple[int, int]:
    """(grace_period, max_t) in steps with the defaults filled in."""
    interval, total = report_interval(cfg), cfg.total_steps
    return scheduler.grace_period or interval, scheduler.max_t or total - interval


def _check_cadence(cfg: TrainConfig, scheduler: SchedulerSection) -> None:
    evaluation = cfg.data.batches_per_epoch * cfg.run.eval_every_epochs
    interval, total = report_interval(cfg), cfg.total_steps
    if interval % evaluation:
        raise ValueError(
            f"run.checkpoint_every: Tune sees test bits/dim only at checkpoints; make it a multiple of "
            f"data.batches_per_epoch * run.eval_every_epochs = {evaluation} (got {interval}) so that every "
            "report carries a fresh evaluation"
        )
    if scheduler.type not in SCHEDULERS:
        raise ValueError(f"scheduler.type: unknown {scheduler.type!r}; choose one of {SCHEDULERS}")
    if scheduler.type == "none":
        return
    if total <= interval:
        raise ValueError(
            f"scheduler.type: asha needs two or more reports per trial; the run has {total} steps and "
            f"checkpoints every {interval} (raise run.epochs or lower run.checkpoint_every)"
        )
    for name in ("grace_period", "max_t"):
        value = getattr(scheduler, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"scheduler.{name}: steps, an integer >= 0 (0 = default), got {value!r}")
    if not _is_number(scheduler.reduction_factor) or scheduler.reduction_factor <= 1:
        raise ValueError(f"scheduler.reduction_factor: must be > 1, got {scheduler.reduction_factor!r}")
    grace, max_t = asha_bounds(cfg, scheduler)
    if max_t > total - interval:
        raise ValueError(
            f"scheduler.max_t: rungs must end before a trial's last report (step {total}), so at most "
            f"{total - interval} steps; got {max_t}"
        )
    if grace > max_t:
        raise ValueError(f"scheduler.grace_period: {grace} steps is beyond max_t ({max_t} steps)")


def _check_run(run: RunSection) -> None:
    if not isinstance(run.name, str) or not run.name or "/" in run.name or run.name.startswith("."):
        raise ValueError(f"run.name: must be a plain directory name, got {run.name!r}")
    if not isinstance(run.storage_path, str) or not run.storage_path:
        raise ValueError("run.storage_path: must name a directory (shared storage on a multi-node cluster)")
    if "://" in run.storage_path:
        raise ValueError(
            f"run.storage_path: {run.storage_path!r}: trials keep Ray Train checkpoints under it with the "
            "pipeline's file paths; use a mounted shared file system (NFS, a bucket mount)"
        )


def _check_mlflow(section: MlflowSection) -> None:
    for name in ("tracking_uri", "experiment", "registered_model_name", "alias"):
        if not isinstance(getattr(section, name), str):
            raise ValueError(f"mlflow.{name}: expected a string")
    alias = section.alias
    ok = alias and all(c.isalnum() or c in "-_" for c in alias) and alias.lower() != "latest"
    if not ok or (alias[0] == "v" and alias[1:].isdigit()):
        raise ValueError(f"mlflow.alias: {alias!r} is not usable (letters, digits, - and _; not latest)")


def load_spec(path: str | os.PathLike) -> SearchSpec:
    return spec_from_dict(read_yaml_file(path) or {}, source=str(path))
