"""The thin Ray Train V2 adapter: the same ``fit`` on every worker of a ``TorchTrainer``.

Ray's part: start or join a cluster, one worker per ``ray.num_workers`` with its resources, the
process group (NCCL on GPUs, gloo on CPU: ``TorchConfig`` picks it from ``use_gpu``), checkpoints
persisted under ``run.root/checkpoints/<run.name>`` with ``CheckpointConfig(num_to_keep)``, and
restarts after worker failures (``FailureConfig(max_failures)``) from the latest checkpoint. A driver
re-run with the same run name resumes the same way. Everything else is pipeline/loop.py.

Ray registers each reported checkpoint and restores the latest one; when that one is unreadable, the
worker falls back to the newest intact older one in the run's folder (pipeline/train_state.py). Ray
deletes old checkpoints by path, so the step re-reached after such a fallback is reported under a
name Ray does not hold yet (``checkpoint_<step>-1``); reporting it under the old name would let Ray's
retention later delete the new checkpoint along with the old entry.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import checkpoint_order, dead_staging, list_checkpoints
from pipeline.config import TrainConfig, checkpoint_root
from pipeline.faults import NO_FAULTS, Faults
from pipeline.logging_setup import configure_console, train_logging_config
from pipeline.loop import FitResult, fit
from pipeline.placement_group_release import ReleasePlacementGroupOnControllerExit
from pipeline.runtime import Runtime, with_sync_batchnorm
from pipeline.train_state import check_resume

log = logging.getLogger(__name__)

# Rank 0 stages each checkpoint in the local temp dir as eiw-ckpt-<pid>-<random> before Ray copies it
# to storage; the pid lets a later writer remove the leftovers of a killed one.
STAGING_PREFIX = "eiw-ckpt-"
STAGING_NAME = re.compile(rf"^{STAGING_PREFIX}(?P<pid>[0-9]+)-[a-z0-9_]+$")
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

# The embedded Ray (no ray.address, no $RAY_ADDRESS) is one machine's training, so it starts lean
# (benchmarks/train.py, docs/benchmarks.md "Ray overhead"): workers at niceness 0, not Ray's 15, so
# training does not yield to the processes it competes with (nothing measurable on the benchmark VM,
# whose kernel groups processes by session before niceness counts); no metrics collection and no
# event statistics in Ray's processes, and no Train preemption watcher (it watches for cloud
# spot-instance notices and polls every few seconds). The dashboard stays on, on 127.0.0.1 only:
# it serves the State API, which Ray Train's placement-group cleaner polls (without it that cleaner
# logs a warning every few seconds and never cleans, issue 25; pipeline/placement_group_release.py
# releases the placement groups either way). RAY_API_SERVER_ADDRESS, inherited by every Ray process
# of this instance, points the cleaner's State API client at this instance's dashboard: otherwise it
# gives up when another Ray instance runs on the same machine ("Found multiple active Ray
# instances"). A cluster started with `ray start` keeps its own settings (RAY_worker_niceness=0 in
# the environment of `ray start` does the first).
EMBEDDED_RAY_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_metrics_collection": False, "event_stats": False}
EMBEDDED_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_ray_init(num_cpus: int | None, **kwargs: Any) -> None:
    """``ray.init`` of a fresh local instance with the settings above (``kwargs`` go to ``ray.init``)."""
    port = _free_port()
    saved = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"  # inherited by the processes ray.init starts
    try:
        # "local": a fresh instance even if another `ray start` cluster runs on this machine.
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _system_config=EMBEDDED_RAY_SYSTEM_CONFIG,
            **kwargs,
        )
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = saved
    if context.dashboard_url and not context.dashboard_url.endswith(f":{port}"):
        log.warning(
            "Ray's dashboard took %s, not port %d: Train's cleaner may not find it",
            context.dashboard_url,
            port,
        )


@contextlib.contextmanager
def embedded_ray_env() -> Iterator[None]:
    """The Train settings of an embedded Ray, as environment variables (read by the driver when a
    ``TorchTrainer`` starts its controller); the caller's own values win, and all are put back after."""
    saved = {k: os.environ.get(k) for k in EMBEDDED_RAY_ENV}
    for k, v in EMBEDDED_RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RayRuntime(Runtime):
    """One Ray Train worker: rank and device from the train context, collectives over the process group."""

    _async_upload = True  # run.async_checkpoints

    def __init__(self, cfg: TrainConfig) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._run_dir = checkpoint_root(cfg) / cfg.run.name
        self._async_upload = cfg.run.async_checkpoints
        self._sync_batchnorm = cfg.ray.sync_batchnorm

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self._distributed:
            return module  # one worker: DDP would only add its hooks
        if self._sync_batchnorm:
            module = with_sync_batchnorm(module, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self._distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def resume_candidates(self) -> Iterator[list[Path]]:
        """Ray's latest registered checkpoint, then the older ones in the run's folder (newest first)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield []
            return
        latest = Path(checkpoint.path).name
        # Only older ones: a newer folder is one Ray never registered (persisted, then a node was lost).
        older = [
            p for p in list_checkpoints(self._run_dir) if checkpoint_order(p.name) < checkpoint_order(latest)
        ]
        with checkpoint.as_directory() as directory:
            yield [Path(directory), *older[::-1]]

    def _unregistered_name(self, name: str) -> str:
        """``name``, or ``name-<n>`` when Ray already holds a checkpoint of that name (module doc)."""
        if not (self._run_dir / name).exists():
            return name
        mode = ray.train.CheckpointConsistencyMode.COMMITTED
        held = {
            Path(r.checkpoint.path).name
            for r in ray.train.get_all_reported_checkpoints(consistency_mode=mode)
        }
        if name not in held:
            return name  # a leftover Ray never registered (a node lost in between): reuse the name
        for n in itertools.count(1):
            if f"{name}-{n}" not in held and not (self._run_dir / f"{name}-{n}").exists():
                log.info("%s is a checkpoint Ray holds already; reporting this one as %s-%d", name, name, n)
                return f"{name}-{n}"
        raise AssertionError("unreachable")

    def save_checkpoint(self, write: Callable[[Path], None] | None, *, name: str, metrics: dict) -> None:
        # ray.train.report is a barrier; Ray registers the checkpoint once it is fully persisted.
        # Rank 0's checkpoint_dir_name is the one Ray uses for every rank. Off the critical path:
        # rank 0's write (serialising the CPU copy) and the upload run in Ray's checkpoint upload
        # thread (checkpoint_upload_mode=ASYNC with our upload function), one at a time.
        if write is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        self.flush_checkpoints()  # at most one in flight
        name = self._unregistered_name(name)
        for leftover in dead_staging(tempfile.gettempdir(), STAGING_NAME):
            shutil.rmtree(leftover, ignore_errors=True)  # another user's stays (no permission)
            if not leftover.exists():
                log.warning("%s: removed, the staging directory of a worker that is gone", leftover)
        staged = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        if not self._async_upload:  # run.async_checkpoints: false (Tune trials): report when persisted
            try:
                write(staged)
                checkpoint = Checkpoint.from_directory(staged)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            return
        done = self._in_flight = threading.Event()

        def write_and_upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
            try:
                write(staged)
                return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
            finally:
                done.set()

        try:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(staged),
                checkpoint_dir_name=name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,  # deletes staged after
                checkpoint_upload_fn=write_and_upload,
            )
        except BaseException:
            done.set()
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics, checkpoint=None)

    def flush_checkpoints(self) -> None:
        """Wait for rank 0's write in flight (Ray raises a failed upload in the training thread)."""
        done, self._in_flight = getattr(self, "_in_flight", None), None
        while done is not None and not done.wait(60):
            log.warning("still writing the previous checkpoint")

    @property
    def run_dir(self) -> Path:
        return self._run_dir


def train_worker(loop_config: dict) -> None:
    """The per-worker function handed to ``TorchTrainer``: the driver's typed config, as it is."""
    configure_console(force=True)  # Ray installed its own root handler in this worker
    cfg: TrainConfig = loop_config["config"]
    fit(cfg, runtime=RayRuntime(cfg), faults=loop_config["faults"])


@contextlib.contextmanager
def ray_session(cfg: TrainConfig) -> Iterator[None]:
    """Join the cluster at ``ray.address`` / $RAY_ADDRESS, else start an embedded one (shut down after)."""
    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        try:
            yield
        finally:
            ray.shutdown()
        return
    embedded_ray_init(cfg.ray.num_cpus or None)
    try:
        with embedded_ray_env():
            yield
    finally:
        ray.shutdown()


def fit_with_ray(
    cfg: TrainConfig,
    *,
    faults: Faults = NO_FAULTS,
    worker_fn: Callable[[dict], None] = train_worker,
    callbacks: Sequence[ray.train.UserCallback] = (),
) -> FitResult:
    """Run ``fit`` on ``cfg.ray.num_workers`` Ray Train workers; returns rank 0's final report.

    The shards must exist (``ensure_data`` in the driver). ``callbacks`` go to the Train ``RunConfig``
    (a Tune trial passes ``TuneReportCallback()``); ``faults`` (tests only) reach every worker.
    """
    check_resume(cfg)  # a changed model section or no intact checkpoint: one ValueError, before Ray retries
    with ray_session(cfg):
        use_gpu = cfg.ray.uses_gpu(ray.cluster_resources())
        resources = {"CPU": cfg.ray.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = cfg.ray.gpus_per_worker
        elif torch.cuda.is_available():
            log.info("ray.use_gpu=%s: training on CPU workers", cfg.ray.use_gpu)
        trainer = TorchTrainer(
            worker_fn,
            train_loop_config={"config": cfg, "faults": faults},
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=str(checkpoint_root(cfg)),
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                logging_config=train_logging_config(),
                # A controller killed mid-run (a trial Tune stops) would keep its placement group
                # while the driver lives: pipeline/placement_group_release.py.
                callbacks=[*callbacks, ReleasePlacementGroupOnControllerExit()],
            ),
        )
        result = trainer.fit()
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    return FitResult.from_report(result.metrics or {}, checkpoint_path=checkpoint_path)
