"""A search, as a YAML file: the base experiment, what every trial overrides, the space, the search.

    base_config: configs/tiny.yaml          # a pipeline experiment (relative to the current directory)
    overrides: {run.epochs: 4}              # dotted TrainConfig keys applied to every trial
    space:                                  # dotted TrainConfig keys -> one domain each
      loss.sigma: {loguniform: [1.0e-4, 1.0e-1]}
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
or an impossible value is a ``ValueError`` naming the dotted field (``space.loss.sigma: ...``).
The file is read by the pipeline's one config loader (pipeline/config_loading.py), with command-line
overrides such as ``search.num_samples=32`` or ``space.model.num_steps={choice: [4, 8]}``.

ASHA works in training steps (``time_attr="step"``, the step Ray Train reports with each checkpoint).
Tune only sees test bits/dim at checkpoints, so the checkpoint cadence must coincide with evaluations.
The last report of a trial is never a rung: a trial that gets there finishes and logs its model.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PlainValidator, PrivateAttr, model_validator

from data_prep.storage import is_uri
from pipeline.config import DirectoryName, MlflowAlias, TrainConfig, load_config
from pipeline.config_loading import (
    ConfigError,
    ConfigModel,
    Overrides,
    load_file,
    revise,
    validate,
    with_overrides,
)

DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
# Sections whose keys are dotted config keys themselves (``space.model.num_steps=...`` on the CLI).
FLAT_SECTIONS = ("overrides", "space")
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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _domain(raw: Any) -> dict[str, Any]:
    """``{loguniform: [1e-4, 1e-1]}`` -> ``{"kind": "loguniform", "values": (0.0001, 0.1)}``."""
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"expected one domain, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}; got {raw!r}")
    ((kind, values),) = raw.items()
    if kind not in DOMAINS:
        raise ValueError(f"unknown domain {kind!r}; choose one of {DOMAINS}")
    if not isinstance(values, list | tuple) or not values:
        raise ValueError(f"{kind} needs a non-empty list")
    if kind in ("choice", "grid"):
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"{kind} lists a value twice: {list(values)!r}")
        return {"kind": kind, "values": tuple(values)}
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise ValueError(f"{kind} needs two numeric bounds [low, high], got {list(values)!r}")
    low, high = values
    if kind == "loguniform" and not (low > 0 and high > 0):
        raise ValueError(f"loguniform needs two positive bounds, got {list(values)!r}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ValueError(f"randint needs integer bounds, got {list(values)!r}")
    if not low < high:
        raise ValueError(f"{kind} needs low < high, got {list(values)!r}")
    return {"kind": kind, "values": (low, high) if kind == "randint" else (float(low), float(high))}


class Dimension(ConfigModel):
    """One searched TrainConfig field: ``kind`` (one of DOMAINS) and its ``values`` (bounds or items)."""

    kind: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    values: tuple[Any, ...]

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, raw: Any) -> Any:
        return raw if isinstance(raw, dict) and set(raw) == {"kind", "values"} else _domain(raw)

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"

    def extremes(self) -> tuple[Any, ...]:
        """The values to type-check against the config: every item, or both ends of a range."""
        return (self.values[0], self.values[1] - 1) if self.kind == "randint" else self.values


def _trial_limit(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"expected auto or an integer >= 1, got {value!r}")


def _storage(path: str) -> str:
    # A local or mounted path, or an object-store URI (s3://bucket/prefix; credentials and endpoint
    # from the environment, read by Ray's pyarrow and by s3fs alike): Tune's state, the trials' Ray
    # Train checkpoints and their run roots all live under it.
    if "://" in path and not is_uri(path):
        raise ValueError(f"{path!r}: expected a local path or an object-store URI such as s3://bucket/tune")
    if is_uri(path) and not path.split("://", 1)[1].strip("/"):
        raise ValueError(f"{path!r}: name a bucket (and optionally a prefix): s3://bucket/tune")
    return path.rstrip("/") if is_uri(path) else path


class SearchSection(ConfigModel):
    algorithm: Literal["optuna", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)  # optuna: trials; grid: repeats of the whole grid
    metric: Literal["test_bits_per_dim"] = "test_bits_per_dim"  # what pipeline/loop.py reports
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: Annotated[int | str, PlainValidator(_trial_limit)] = "auto"
    seed: int = 0
    max_failures: int = Field(1, ge=-1)  # Tune retries of a whole trial (Ray Train retries workers itself)


class SchedulerSection(ConfigModel):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(0, ge=0)  # steps; 0 = the first report
    max_t: int = Field(0, ge=0)  # steps; 0 = the last report before the end
    reduction_factor: float = Field(3.0, gt=1)


class RunSection(ConfigModel):
    name: DirectoryName
    storage_path: Annotated[str, Field(min_length=1), AfterValidator(_storage)] = "runs/tune"


class MlflowSection(ConfigModel):
    tracking_uri: str = ""  # empty: the base config's (then $MLFLOW_TRACKING_URI, then run.root's sqlite)
    experiment: str = ""  # empty: the base config's
    registered_model_name: str = ""  # empty: the base config's mlflow.registered_model
    alias: MlflowAlias = "tuned"


class SearchSpec(ConfigModel):
    """The validated search file; ``base`` is its base experiment with the overrides applied, the
    config every trial starts from (built once, here)."""

    base_config: str = Field(min_length=1)
    overrides: dict[str, Any] = {}
    space: dict[str, Dimension]
    search: SearchSection = SearchSection()
    scheduler: SchedulerSection = SchedulerSection()
    run: RunSection
    mlflow: MlflowSection = MlflowSection()
    _base: TrainConfig = PrivateAttr()

    @property
    def base(self) -> TrainConfig:
        return self._base

    @model_validator(mode="after")
    def _fits_the_base_config(self) -> SearchSpec:
        self._base = base = _base_config(self.base_config, self.overrides)
        if not self.space:
            raise ValueError("space: needs at least one dimension")
        for key, dim in self.space.items():
            where = f"space.{key}"
            if key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS:
                raise ValueError(
                    f"{where}: run.*, mlflow.*, ray.* and data.batches_per_epoch are fixed for the whole "
                    "search (step budget, report cadence, resources); set them in overrides"
                )
            if self.search.algorithm == "grid" and dim.kind != "grid":
                raise ValueError(
                    f"{where}: search.algorithm grid needs grid: [...] in every dimension, got {dim.kind}"
                )
            if self.search.algorithm == "optuna" and dim.kind == "grid":
                raise ValueError(f"{where}: grid needs search.algorithm: grid (Optuna: use choice)")
            for value in dim.extremes():
                try:
                    revise(base, {key: value})
                except ValueError as e:
                    raise ValueError(f"{where}: {value!r} is not a valid {key} ({e})") from e
        _check_cadence(base, self.scheduler)
        return self


def _base_config(path: str, overrides: dict[str, Any]) -> TrainConfig:
    try:
        base = load_config(path)
    except ValueError as e:
        raise ValueError(f"base_config: {e}") from e
    for key in overrides:
        if key in SET_BY_SEARCH:
            raise ValueError(f"overrides.{key}: set by the search for each trial; leave it out")
    try:
        return revise(base, overrides)
    except ConfigError as e:
        raise ConfigError([(f"overrides.{k}" if k else "overrides", m) for k, m in e.problems]) from e
    except ValueError as e:
        raise ValueError(f"overrides: {e}") from e


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
    if scheduler.type == "none":
        return
    if total <= interval:
        raise ValueError(
            f"scheduler.type: asha needs two or more reports per trial; the run has {total} steps and "
            f"checkpoints every {interval} (raise run.epochs or lower run.checkpoint_every)"
        )
    grace, max_t = asha_bounds(cfg, scheduler)
    if max_t > total - interval:
        raise ValueError(
            f"scheduler.max_t: rungs must end before a trial's last report (step {total}), so at most "
            f"{total - interval} steps; got {max_t}"
        )
    if grace > max_t:
        raise ValueError(f"scheduler.grace_period: {grace} steps is beyond max_t ({max_t} steps)")


def spec_from_dict(data: Any, overrides: Overrides = (), *, source: str = "") -> SearchSpec:
    """Validate a search file's contents (plus overrides); ValueError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError([("", f"expected a mapping of sections, got {type(data).__name__}")], source)
    return validate(SearchSpec, with_overrides(data, overrides, flat_sections=FLAT_SECTIONS), source=source)


def load_spec(path: str | os.PathLike, overrides: Overrides = ()) -> SearchSpec:
    return load_file(SearchSpec, path, overrides, flat_sections=FLAT_SECTIONS)
