"""The typed training configuration: model x data x optimiser x run x MLflow x Ray.

An experiment is a YAML file in configs/ whose top-level keys are the sections of ``TrainConfig``;
missing keys take the defaults below. ``load_config`` reads it with overrides ``a.b=c`` (YAML values:
``optim.lr=3e-4``, ``model.image_shape=[3,64,64]``) through pipeline/config_loading.py, so a typo in
either place is the same ``ValueError`` naming the dotted key. ``model`` is flows' own ``FlowConfig``
dataclass, validated by pydantic from here (its ``__post_init__`` checks included).

``data.root`` and ``run.root`` may be object-storage URIs (``s3://bucket/prefix``; credentials and
endpoint from the environment, docs/operations.md). Relative paths are resolved against the current
directory by
``resolve`` in the driver, before workers see the config: Ray workers (and ``ray job submit``
drivers) run in other directories. The resolved ``TrainConfig`` object itself travels to every worker.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PlainValidator, field_validator, model_validator

from data_prep.storage import RemotePath, as_path, is_uri
from flows import FlowConfig, SplitConfig
from pipeline.config_loading import ConfigModel, Overrides, load_file, revise, validate, with_overrides
from pipeline.device_settings import GpuConfig
from pipeline.model_section import ModelSection

AUTO = "auto"
# The pipeline trains EIW-Flow unless told otherwise; flows' own SplitConfig default is Glow's static split.
DEFAULT_SPLIT_STRATEGY = "eiw"


def _switch(value: Any) -> bool | str:
    if isinstance(value, bool) or value == AUTO:
        return value
    raise ValueError(f"expected true, false or auto, got {value!r}")


def _plain_directory_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"must be a plain directory name, got {name!r}")
    return name


def _mlflow_alias(alias: str) -> str:
    # MLflow's rule: letters, digits, - and _; "latest" and "v<number>" already mean versions.
    usable = alias and all(c.isalnum() or c in "-_" for c in alias)
    if not usable or alias.lower() == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
        raise ValueError(f"{alias!r} is not usable (letters, digits, - and _; latest and v<n> are reserved)")
    return alias


Switch = Annotated[bool | Literal["auto"], PlainValidator(_switch)]
DirectoryName = Annotated[str, AfterValidator(_plain_directory_name)]
MlflowAlias = Annotated[str, AfterValidator(_mlflow_alias)]


class SampleDataConfig(ConfigModel):
    """How the built-in sample set is built when ``data.source`` is ``sample`` and it is missing."""

    num_train: int = Field(4000, ge=1)
    num_test: int = Field(500, ge=1)
    shard_size: int = Field(1000, ge=1)
    seed: int = 0


class DataConfig(ConfigModel):
    """Shards under ``root/{train,test}/`` (data_prep's layout). Batch sizes are per worker.

    ``source: sample`` builds the built-in sample set into ``root`` if it is missing; ``shards`` expects
    a finished ``python -m data_prep`` output. A train manifest with ``train_crop`` (LSUN's Glow
    protocol) makes training take random crops and evaluation the central crop of that size.
    """

    source: Literal["sample", "shards"] = "sample"
    root: str = Field("data/sample-32", min_length=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    batches_per_epoch: int = Field(100, ge=1)
    loader_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    random_flip: bool = False
    # A shard whose sha256 differs from its manifest's (checked as it streams): stop, or drop it and go on.
    on_corrupt_shard: Literal["fail", "skip"] = "fail"
    sample: SampleDataConfig = SampleDataConfig()


class OptimConfig(ConfigModel):
    """Adam or Adamax; linear warm-up over ``warmup_steps``, then ``schedule``:

    - ``exponential``: ``decay_per_epoch ** epoch`` (what DenseFlow's ``--gamma`` reads as: 0.95 would
      end ImageNet-64's 10 epochs near 0.63x lr, CIFAR-10's 400 epochs at 0.9975 near 0.37x).
    - ``constant_after_warmup``: the rate DenseFlow's code actually trained at. Their
      ``LinearWarmupScheduler`` is stepped every iteration and returns the absolute
      ``base_lr * min(1, t / warmup)``, overwriting ``ExponentialLR``'s per-epoch ``lr * gamma``, so
      after warm-up the rate is ``lr`` on every step except each epoch's first, which sees
      ``decay_per_epoch * lr`` once (reproduced; the decay never compounds). docs/model.md lists it.

    The regulariser weight is a loss setting: ``loss.sigma`` (``LossConfig``).

    ``reference_batch``: the global batch (``data.batch_size x ray.num_workers x accumulate``) that
    ``lr`` was chosen for, i.e. the recipe's; null = no check. When a run's global batch B differs from it the
    pipeline warns, naming both, and ``lr_scaling`` decides the learning rate actually used:
    ``none`` keeps ``lr`` (warn only), ``linear`` uses ``lr * B / reference_batch`` (Goyal et al.
    2017, for SGD), ``sqrt`` uses ``lr * sqrt(B / reference_batch)`` (the square-root rule, which
    Malladi et al. 2022 derive for Adam-type optimisers). Warm-up and decay stay in steps.

    ``accumulate``: micro-batches of ``data.batch_size`` per optimizer step (DDP all-reduces once,
    after the last), so the global batch is ``data.batch_size x ray.num_workers x accumulate``.
    It does not enlarge BatchNorm's statistics batch (each micro-batch normalises alone; see
    ``ray.sync_batchnorm``). ``ema_decay``: keep an exponential moving average of the weights
    (null = off), evaluated and registered beside the raw ones (pipeline/ema.py).
    """

    name: Literal["adam", "adamax"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(200, ge=0)
    decay_per_epoch: float = Field(1.0, gt=0, le=1)
    schedule: Literal["exponential", "constant_after_warmup"] = "exponential"
    grad_clip_norm: float = Field(50.0, gt=0)
    reference_batch: int | None = Field(None, ge=1)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    accumulate: int = Field(1, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _scaling_needs_a_reference(self) -> OptimConfig:
        if self.lr_scaling != "none" and self.reference_batch is None:
            raise ValueError(
                f"lr_scaling: {self.lr_scaling} needs reference_batch (the global batch lr was chosen for)"
            )
        return self

    def lr_for_batch(self, global_batch: int) -> float:
        """The learning rate for a run whose global batch is ``global_batch`` (``lr_scaling``'s rule)."""
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if self.reference_batch is None or self.lr_scaling == "none":
            return self.lr
        ratio = global_batch / self.reference_batch
        return self.lr * (ratio if self.lr_scaling == "linear" else ratio**0.5)


class LossConfig(ConfigModel):
    """What the trainer minimises: ``flows.training_loss`` = mean bits/dim + ``sigma`` x the split
    strategy's regulariser (``model.regularization()``; 0 for static splits and LCMA).

    ``sigma`` is a training setting, not a model one: the model section describes the flow (what its
    parameters mean), this one what the trainer reads, so it may change on resume. Its default is the
    EIW authors' ``--sigma`` (studying910/EIW-Flow). Formerly ``model.split.sigma`` (still read, with
    a deprecation warning).
    """

    sigma: float = Field(1e-3, ge=0, allow_inf_nan=False)


# Keys moved out of the model section: old YAML, overrides, tune spaces and checkpoints' saved configs
# still carry them. old dotted key -> new dotted key.
MOVED_KEYS = {"model.split.sigma": "loss.sigma"}


def _pop_dotted(data: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        return True, node.pop(leaf)
    return False, None


def migrate_moved_keys(data: Any, *, warn: bool = True) -> Any:
    """A config dict with every ``MOVED_KEYS`` old key moved to its new one (a copy; a
    ``FutureWarning`` naming the new key when ``warn``). ValueError when both are given and differ."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        found, value = _pop_dotted(data, old)
        if not found:
            continue
        if warn:
            warnings.warn(f"{old} is deprecated: it is now {new}; write {new}", FutureWarning, stacklevel=2)
        section, leaf = new.rsplit(".", 1)
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the section itself is malformed: validation names it
        if leaf in target and target[leaf] != value:
            raise ValueError(
                f"{old} ({value}) and {new} ({target[leaf]}) are both given and differ; keep only {new}"
            )
        target[leaf] = value
    return data


class RunConfig(ConfigModel):
    """Length, cadence, checkpoints and precision of one named run.

    Checkpoints live in ``root/checkpoints/name/`` (Ray Train's storage_path/name); a re-run with the
    same ``name`` resumes from the latest one. ``num_threads``: torch CPU threads per process (0 = torch's
    default; Ray workers get ``ray.cpus_per_worker``). ``iwbo_samples``: K > 0 adds the importance-weighted
    bound with K draws of the noise (dequantization, DenseFlow's augmentation) to the final test
    evaluation, ``test/iwbo_bits_per_dim`` (DenseFlow reports K = 1000 on CIFAR-10, 200 on ImageNet);
    ``iwbo_chunk``: images x draws per forward pass (0 = ``data.eval_batch_size``).
    ``async_checkpoints``: write and upload checkpoints off the training thread (the plain loop's
    background writer; Ray Train's asynchronous upload), so a step never waits for storage. Tune
    trials turn it off: a scheduler (ASHA) decides on each report, and an asynchronous report reaches
    it only after the workers have trained on past the rung.
    ``compile``: ``torch.compile`` of the training objective (auto: on CUDA, eager on CPU;
    pipeline/device_settings.py); it may change on resume.
    """

    name: DirectoryName = "sample"
    root: str = Field("runs", min_length=1)
    epochs: int = Field(10, ge=1)
    seed: int = 0
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every_epochs: int = Field(1, ge=1)
    sample_temperatures: tuple[Annotated[float, Field(ge=0)], ...] = Field((0.5, 0.7, 1.0), min_length=1)
    num_samples: int = Field(36, ge=1)
    max_nonfinite_in_row: int = Field(20, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    progress_bar: Switch = AUTO
    num_threads: int = Field(0, ge=0)
    iwbo_samples: int = Field(0, ge=0)
    iwbo_chunk: int = Field(0, ge=0)
    async_checkpoints: bool = True
    compile: Switch = AUTO


# The YAML key is `register`; as a field it shadows ABCMeta.register on the class only, harmlessly.
warnings.filterwarnings("ignore", 'Field name "register" in "MlflowConfig" shadows', UserWarning)


class MlflowConfig(ConfigModel):
    """Tracking and registry. An empty ``tracking_uri`` means $MLFLOW_TRACKING_URI, else a sqlite
    store ``run.root/mlflow.db`` with artifacts in ``run.root/mlartifacts``.

    MLflow reserves the alias ``latest`` (``models:/<name>/latest`` already means the newest version),
    so the alias that follows every new version is ``newest_alias``.

    ``parent_run_id``: nest the run under that MLflow run (a search's parent run; tune/ sets it).
    ``register_weights``: the weights logged and registered as the model, ``ema`` (the average,
    ``optim.ema_decay``) or ``raw``; ``auto`` = ema when the average is kept, else raw.

    Live tracking: metrics every ``run.log_every`` steps through MLflow's asynchronous logging
    (``async_metrics: false`` makes every log step wait for the server); ``system_metrics``: MLflow's
    CPU, memory, disk, network (and NVML GPU) figures of the rank-0 node every
    ``system_metrics_interval_s`` seconds ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).

    ``log_checkpoint``: also keep the final checkpoint as a run artifact (Ray Train's storage keeps
    every checkpoint anyway); ``auto`` does so only while the checkpoint (weights and optimizer
    state) is at most ``log_checkpoint_max_mb``, so paper-scale runs skip it. Large files go up in
    parts through a tracking server's artifact proxy.
    """

    tracking_uri: str = ""
    experiment: str = Field("eiw-flow", min_length=1)
    registered_model: str = "eiw-flow-sample"
    log_model: bool = True
    register: bool = True
    newest_alias: MlflowAlias = "newest"
    champion_alias: MlflowAlias = "champion"
    log_checkpoint: Switch = AUTO
    log_checkpoint_max_mb: float = Field(256.0, gt=0)
    async_metrics: bool = True
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)
    parent_run_id: str = ""
    # A resumed checkpoint names an MLflow run this tracking server lacks: fail (say so), or start a
    # new run tagged pipeline.previous_run_id with the old id.
    on_missing_run: Literal["fail", "new"] = "fail"
    register_weights: Literal["auto", "ema", "raw"] = "auto"

    @model_validator(mode="after")
    def _registry_needs(self) -> MlflowConfig:
        if self.register and not self.registered_model:
            raise ValueError("registered_model: must not be empty when register is true")
        if self.register and not self.log_model:
            raise ValueError("register: needs log_model: true (the registry holds logged models)")
        if self.newest_alias == self.champion_alias:
            raise ValueError("champion_alias: must differ from newest_alias")
        return self


class RayConfig(ConfigModel):
    """Ray Train scaling. ``enabled: false`` runs the plain loop in this process with no Ray at all.

    ``address`` empty: $RAY_ADDRESS (set by ``ray job submit``) or a local embedded Ray started with
    ``num_cpus`` logical CPUs (0 = Ray's default). ``use_gpu``: true, false or auto (when the cluster
    has GPUs). ``sync_batchnorm``: BatchNorm (DenseFlow's dense nets) normalises over every worker's
    images together (``torch.nn.SyncBatchNorm``; GPU workers only, pipeline/runtime.py).
    """

    enabled: bool = True
    address: str = ""
    num_cpus: int = Field(0, ge=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: Switch = AUTO
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    max_failures: int = Field(2, ge=-1)  # -1 = retry forever
    sync_batchnorm: bool = False

    def uses_gpu(self, cluster_resources: Mapping[str, float]) -> bool:
        """``use_gpu``, with ``auto`` decided by the cluster: GPU workers when it has a GPU."""
        return self.use_gpu if isinstance(self.use_gpu, bool) else cluster_resources.get("GPU", 0) >= 1


def _default_model() -> FlowConfig:
    return FlowConfig(split=SplitConfig(strategy=DEFAULT_SPLIT_STRATEGY))


class TrainConfig(ConfigModel):
    model: ModelSection = Field(default_factory=_default_model)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    run: RunConfig = RunConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()
    gpu: GpuConfig = GpuConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        return migrate_moved_keys(data)

    @field_validator("model", mode="before")
    @classmethod
    def _default_strategy(cls, model: Any) -> Any:
        """A model section that does not name its split strategy gets the pipeline's default."""
        if isinstance(model, dict) and isinstance(model.get("split", {}), dict):
            if "strategy" not in model.get("split", {}):
                return with_overrides(model, {"split.strategy": DEFAULT_SPLIT_STRATEGY})
        return model

    @model_validator(mode="after")
    def _one_worker_without_ray(self) -> TrainConfig:
        if self.ray.num_workers > 1 and not self.ray.enabled:
            raise ValueError("ray.num_workers: more than one worker needs ray.enabled: true")
        return self

    @model_validator(mode="after")
    def _ema_weights_need_an_average(self) -> TrainConfig:
        if self.mlflow.register_weights == "ema" and self.optim.ema_decay is None:
            raise ValueError("mlflow.register_weights: ema needs optim.ema_decay (no average is kept)")
        return self

    @model_validator(mode="after")
    def _lcma_warms_up_within_the_run(self) -> TrainConfig:
        split = self.model.split
        if split.strategy == "lcma" and self.total_steps <= split.warmup_steps:
            warnings.warn(
                f"model.split.warmup_steps ({split.warmup_steps}) is not below the run's "
                f"{self.total_steps} steps (run.epochs x data.batches_per_epoch): LCMA never freezes an "
                "order and the split stays static for the whole run; lower warmup_steps",
                UserWarning,
                stacklevel=2,
            )
        return self

    @property
    def total_steps(self) -> int:
        return self.run.epochs * self.data.batches_per_epoch


class _FlowConfigFile(ConfigModel):
    model: ModelSection


def flow_config_from_dict(data: Any, *, source: str = "") -> FlowConfig:
    """A plain dict (a logged model's ``flow_config.json``) -> ``FlowConfig``, checked like an
    experiment's model section: an unknown key or bad value is a ValueError naming ``model.<field>``."""
    # A model logged before sigma moved to the loss section carries split.sigma: not a model setting.
    data = migrate_moved_keys({"model": data}, warn=False)
    data.pop("loss", None)
    return validate(_FlowConfigFile, data, source=source).model


def load_config(path: str | os.PathLike | None, overrides: Overrides = ()) -> TrainConfig:
    """Experiment YAML (or the defaults when ``path`` is None) + overrides -> TrainConfig."""
    if path is None:
        return validate(TrainConfig, with_overrides({}, overrides))
    return load_file(TrainConfig, path, overrides)


def config_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve(cfg: TrainConfig, *, cwd: str | os.PathLike | None = None) -> TrainConfig:
    """Absolute paths and a concrete tracking URI, fixed once in the driver (see module doc).

    Object-storage URIs (``s3://bucket/prefix``; data_prep/storage.py) stay as they are. A run root in
    object storage needs a tracking URI: the default sqlite store cannot live in a bucket."""
    base = Path(cwd or os.getcwd())

    def absolute(path: str) -> str:
        return path.rstrip("/") if is_uri(path) else str((base / path).resolve())

    run_root = absolute(cfg.run.root)
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and is_uri(run_root):
        raise ValueError(
            f"run.root: {run_root} is object storage, where the default sqlite MLflow store cannot live; "
            "set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server (its "
            "--artifacts-destination may be the same bucket) or a database"
        )
    if not uri:
        uri = f"sqlite:///{Path(run_root) / 'mlflow.db'}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    return revise(
        cfg,
        {
            "data.root": absolute(cfg.data.root),
            "run.root": run_root,
            "mlflow.tracking_uri": uri,
        },
    )


def checkpoint_root(cfg: TrainConfig) -> Path | RemotePath:
    """Ray Train's storage_path; the run's checkpoints are in ``checkpoint_root(cfg) / cfg.run.name``
    (a ``RemotePath`` when ``run.root`` is an object-storage URI)."""
    return as_path(cfg.run.root) / "checkpoints"
