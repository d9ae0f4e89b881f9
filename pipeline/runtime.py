"""What the training loop needs from its surroundings, and the single-process implementation.

The loop in pipeline/loop.py never imports Ray or touches ``torch.distributed``; it asks a runtime
for its rank, device, collectives and checkpoint storage. ``LocalRuntime`` is one process with
checkpoints in a local directory or an object-storage prefix (``s3://bucket/...``);
``pipeline.ray_adapter.RayRuntime`` is a Ray Train worker.

Checkpoints are written off the critical path: ``save_checkpoint`` gets a writer for a state the
caller has already copied to CPU (``pipeline.checkpoint_writer.cpu_copy``), starts it in a background thread
(at most one in flight) and returns; ``flush_checkpoints`` waits for it (the loop calls it at the end
of a run, also a failed one, so the last checkpoint taken is complete before anyone resumes).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data_prep.storage import RemotePath
from pipeline.checkpoint import run_checkpoints
from pipeline.checkpoint_writer import CheckpointWriter


def default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def with_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm replaced by ``torch.nn.SyncBatchNorm`` (in place for children;
    same parameters, buffers and state_dict keys), so a training forward normalises with the
    statistics of all ranks' images together (DenseFlow at 4 images per GPU x 8 GPUs: the authors'
    32). torch 2.14's SyncBatchNorm synchronises CUDA (and XPU/HPU) tensors only: under a gloo
    process group on CPU it raises in training, so CPU workers are refused here (``ray.sync_batchnorm``).
    Outside training (eval) and in one process it is plain BatchNorm.
    """
    if device.type not in ("cuda", "xpu", "hpu"):
        raise ValueError(
            f"ray.sync_batchnorm: torch's SyncBatchNorm needs GPU workers, these run on {device.type}; "
            "set ray.sync_batchnorm=false (each worker then normalises its own batch)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class Runtime:
    """The interface (and the trivial world-size-1 behaviour of the collectives)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """Wrap the training module for gradient synchronisation (identity in one process)."""
        return module

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def resume_candidates(self) -> contextlib.AbstractContextManager[list[Path]]:
        """The checkpoint directories a restart may resume from, newest first: the latest, then the
        older ones to fall back to when it is unreadable. Empty for a fresh run."""
        raise NotImplementedError

    def save_checkpoint(self, write: Callable[[Path], None] | None, *, name: str, metrics: dict) -> None:
        """Collective: every rank calls it; rank 0 passes ``write(directory)``, the others None.

        ``write`` must only read a state copied for it (it may run in a background thread after this
        returns). The checkpoint is the latest one a restart sees once it is fully written; a
        previous write still in flight is waited for first.
        """
        raise NotImplementedError

    def flush_checkpoints(self) -> None:
        """Wait for the checkpoint write in flight, if any; raise its error if it failed."""

    def report(self, metrics: dict) -> None:
        """Collective: hand the driver a result without a checkpoint (Ray Train: ``ray.train.report``;
        one process: there is no driver to tell)."""

    @property
    def run_dir(self) -> Path | RemotePath:
        """A directory shared by the run's workers (fault-injection markers)."""
        raise NotImplementedError


class LocalRuntime(Runtime):
    """One process, no Ray: checkpoints in ``checkpoint_dir/checkpoint_<step>`` (a local folder or an
    object-storage URI). ``background=False`` writes them in the training thread (benchmarks)."""

    def __init__(
        self,
        checkpoint_dir: str | Path | RemotePath,
        *,
        num_to_keep: int,
        device: torch.device | None = None,
        background: bool = True,
    ):
        self.device = device or default_device()
        self.checkpoints = run_checkpoints(checkpoint_dir, num_to_keep=num_to_keep)
        self.writer = CheckpointWriter(background=background)

    @contextlib.contextmanager
    def resume_candidates(self) -> Iterator[list[Path]]:
        self.checkpoints.clean_stale()  # may also put back a checkpoint a dead writer had moved aside
        yield self.checkpoints.all()[::-1]

    def save_checkpoint(self, write: Callable[[Path], None] | None, *, name: str, metrics: dict) -> None:
        assert write is not None, "rank 0 must pass the writer"
        self.writer.submit(lambda: self._write(write, name))

    def _write(self, write: Callable[[Path], None], name: str) -> None:
        staged = self.checkpoints.staging(name)
        try:
            write(staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # e.g. a full disk: give the space back
            raise
        self.checkpoints.commit(staged, name)

    def flush_checkpoints(self) -> None:
        self.writer.flush()

    @property
    def run_dir(self) -> Path | RemotePath:
        return self.checkpoints.directory
