"""The typed training configuration: model x data x optimiser x run x MLflow x Ray.

An experiment is a YAML file in configs/ whose top-level keys are the sections of ``TrainConfig``;
missing keys take the defaults below. CLI overrides ``a.b=c`` are parsed as YAML scalars
(``optim.lr=3e-4``, ``run.fail_at_step=12``, ``model.image_shape=[3,64,64]``) and applied before
the typed load, so a typo in either place is the same ``ValueError`` naming the dotted key.

Relative paths (``data.root``, ``run.root``) are resolved against the current directory by
``resolve`` in the driver, before workers see the config: Ray workers (and ``ray job submit``
drivers) run in other directories.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flows import FlowConfig, SplitConfig, dataclass_from_dict, dataclass_to_dict
from flows.strategies import STRATEGIES

DATA_SOURCES = ("sample", "shards")
OPTIMIZERS = ("adam", "adamax")
PRECISIONS = ("auto", "bf16", "fp32")
AUTO = "auto"
RESERVED_ALIASES = ("latest",)


def _check_switch(name: str, value: bool | str) -> None:
    if not isinstance(value, bool) and value != AUTO:
        raise ValueError(f"{name}: expected true, false or auto, got {value!r}")


def default_split_strategy() -> str:
    """EIW-Flow's Shuffle split when the library has it, else the first registered strategy."""
    return "eiw" if "eiw" in STRATEGIES else STRATEGIES[0]


@dataclass(kw_only=True)
class SampleDataConfig:
    """How the built-in sample set is built when ``data.source`` is ``sample`` and it is missing."""

    num_train: int = 4000
    num_test: int = 500
    shard_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_test", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class DataConfig:
    """Shards under ``root/{train,test}/`` (data_prep's layout). Batch sizes are per worker.

    ``source: sample`` builds the built-in sample set into ``root`` if it is missing; ``shards`` expects
    a finished ``python -m data_prep`` output. A train manifest with ``train_crop`` (LSUN's Glow
    protocol) makes training take random crops and evaluation the central crop of that size.
    """

    source: str = "sample"
    root: str = "data/sample-32"
    batch_size: int = 64
    eval_batch_size: int = 256
    batches_per_epoch: int = 100
    loader_workers: int = 0
    shuffle_buffer: int = 1000
    random_flip: bool = False
    sample: SampleDataConfig = field(default_factory=SampleDataConfig)

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"source: unknown {self.source!r}; choose one of {DATA_SOURCES}")
        if not self.root:
            raise ValueError("root: must name the shard directory")
        for name in ("batch_size", "eval_batch_size", "batches_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.loader_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("loader_workers and shuffle_buffer: must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """Adam or Adamax; linear warm-up, then ``decay_per_epoch ** epoch`` (DenseFlow uses 0.95).

    The regulariser weight is the model's: loss = bits/dim + model.split.sigma * regularizer.
    """

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 200
    decay_per_epoch: float = 1.0
    grad_clip_norm: float = 50.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name: unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps: must be >= 0")
        if not 0.0 < self.decay_per_epoch <= 1.0:
            raise ValueError(f"decay_per_epoch: must be in (0, 1], got {self.decay_per_epoch}")
        if not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm: must be > 0, got {self.grad_clip_norm}")


@dataclass(kw_only=True)
class RunConfig:
    """Length, cadence, checkpoints, precision and fault injection of one named run.

    Checkpoints live in ``root/checkpoints/name/`` (Ray Train's storage_path/name); a re-run with the
    same ``name`` resumes from the latest one. ``num_threads``: torch CPU threads per process (0 = torch's
    default; Ray workers get ``ray.cpus_per_worker``). ``fail_at_step`` (a test hook) raises once in the last
    rank at that step; ``nan_loss_from_step`` replaces the loss by NaN from that step on.
    """

    name: str = "sample"
    root: str = "runs"
    epochs: int = 10
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every_epochs: int = 1
    sample_temperatures: tuple[float, ...] = (0.5, 0.7, 1.0)
    num_samples: int = 36
    max_nonfinite_in_row: int = 20
    precision: str = "auto"
    progress_bar: bool | str = AUTO
    num_threads: int = 0
    fail_at_step: int = 0
    nan_loss_from_step: int = 0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: must be a plain directory name, got {self.name!r}")
        for name in (
            "epochs",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every_epochs",
            "num_samples",
            "max_nonfinite_in_row",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.sample_temperatures or any(t < 0 for t in self.sample_temperatures):
            raise ValueError(
                f"sample_temperatures: need >= 1 non-negative value, got {self.sample_temperatures}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: unknown {self.precision!r}; choose one of {PRECISIONS}")
        _check_switch("progress_bar", self.progress_bar)
        if self.num_threads < 0:
            raise ValueError(f"num_threads: must be >= 0 (0 = torch's default), got {self.num_threads}")
        if self.fail_at_step < 0 or self.nan_loss_from_step < 0:
            raise ValueError("fail_at_step and nan_loss_from_step: must be >= 0 (0 = off)")


@dataclass(kw_only=True)
class MlflowConfig:
    """Tracking and registry. An empty ``tracking_uri`` means $MLFLOW_TRACKING_URI, else a sqlite
    store ``run.root/mlflow.db`` with artifacts in ``run.root/mlartifacts``.

    MLflow reserves the alias ``latest`` (``models:/<name>/latest`` already means the newest version),
    so the alias that follows every new version is ``newest_alias``.

    ``parent_run_id``: nest the run under that MLflow run (a search's parent run; tune/ sets it).
    """

    tracking_uri: str = ""
    experiment: str = "eiw-flow"
    registered_model: str = "eiw-flow-sample"
    log_model: bool = True
    register: bool = True
    newest_alias: str = "newest"
    champion_alias: str = "champion"
    log_checkpoint: bool = True
    parent_run_id: str = ""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment: must not be empty")
        if self.register and not self.registered_model:
            raise ValueError("registered_model: must not be empty when register is true")
        if self.register and not self.log_model:
            raise ValueError("register: needs log_model: true (the registry holds logged models)")
        for name in ("newest_alias", "champion_alias"):
            alias = getattr(self, name)
            if not alias or alias.lower() in RESERVED_ALIASES or alias[0] == "v" and alias[1:].isdigit():
                raise ValueError(f"{name}: {alias!r} is reserved by MLflow; pick another alias name")
        if self.newest_alias == self.champion_alias:
            raise ValueError("newest_alias and champion_alias: must differ")


@dataclass(kw_only=True)
class RayConfig:
    """Ray Train scaling. ``enabled: false`` runs the plain loop in this process with no Ray at all.

    ``address`` empty: $RAY_ADDRESS (set by ``ray job submit``) or a local embedded Ray started with
    ``num_cpus`` logical CPUs (0 = Ray's default). ``use_gpu``: true, false or auto (when the cluster
    has GPUs).
    """

    enabled: bool = True
    address: str = ""
    num_cpus: int = 0
    num_workers: int = 1
    use_gpu: bool | str = AUTO
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        _check_switch("use_gpu", self.use_gpu)
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.num_cpus < 0:
            raise ValueError("num_cpus, cpus_per_worker and gpus_per_worker: must be >= 0")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: must be >= -1 (-1 = retry forever), got {self.max_failures}")


def _default_model() -> FlowConfig:
    return FlowConfig(split=SplitConfig(strategy=default_split_strategy()))


@dataclass(kw_only=True)
class TrainConfig:
    model: FlowConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def total_steps(self) -> int:
        return self.run.epochs * self.data.batches_per_epoch


# ---------------------------------------------------------------------------------------- loading
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


@functools.cache
def _yaml_loader() -> type:
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1, and so PyYAML, wants ``3.0e-4``).

    Built on first use: the step math and the benchmark import this module on machines with only torch.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


def _yaml_load(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML ({e})") from e


def read_yaml_file(path: str | os.PathLike) -> Any:
    """A config file's YAML (with ``3e-4`` read as a float); ValueError naming the file if it is
    missing or not valid YAML. Shared by experiment, search and comparison files."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {str(p)!r}")
    try:
        return _yaml_load(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c). ValueError on anything else."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p or not p.isidentifier() for p in parts):
        raise ValueError(f"bad override {text!r}: expected section.key=value, e.g. optim.lr=3e-4")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except ValueError as e:
        raise ValueError(f"bad override {text!r}: value is {e}") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of the nested dict; unknown keys are caught by the typed load."""
    out = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"bad override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Typed load with the cross-section checks; ValueError names the offending key."""
    data = _deep_copy(data)
    model = data.get("model")
    if isinstance(model, dict):
        split = model.setdefault("split", {})
        if isinstance(split, dict):
            split.setdefault("strategy", default_split_strategy())
            strategy = split["strategy"]
            if isinstance(strategy, str) and strategy not in STRATEGIES:
                raise ValueError(f"model.split.strategy: unknown {strategy!r}; choose one of {STRATEGIES}")
    cfg = dataclass_from_dict(TrainConfig, data)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: TrainConfig) -> None:
    """Checks that span sections (each section checks its own fields)."""
    if cfg.ray.num_workers > 1 and not cfg.ray.enabled:
        raise ValueError("ray.num_workers: more than one worker needs ray.enabled: true")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (or the defaults when ``path`` is None) + ``a.b=c`` overrides -> TrainConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{p}: expected a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclass_to_dict(cfg)


def config_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------ resolution
def resolve(cfg: TrainConfig, *, cwd: str | os.PathLike | None = None) -> TrainConfig:
    """Absolute paths and a concrete tracking URI, fixed once in the driver (see module doc)."""
    base = Path(cwd or os.getcwd())
    data_root = str((base / cfg.data.root).resolve())
    run_root = (base / cfg.run.root).resolve()
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{run_root / 'mlflow.db'}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    return replace(
        cfg,
        data=replace(cfg.data, root=data_root),
        run=replace(cfg.run, root=str(run_root)),
        mlflow=replace(cfg.mlflow, tracking_uri=uri),
    )


def checkpoint_root(cfg: TrainConfig) -> Path:
    """Ray Train's storage_path; the run's checkpoints are in ``checkpoint_root(cfg) / cfg.run.name``."""
    return Path(cfg.run.root) / "checkpoints"
