"""What the training loop needs from its surroundings, and the single-process implementation.

The loop in pipeline/loop.py never imports Ray or touches ``torch.distributed``; it asks a runtime
for its rank, device, collectives and checkpoint storage. ``LocalRuntime`` is one process with
checkpoints in a local directory; ``pipeline.ray_adapter.RayRuntime`` is a Ray Train worker.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.checkpoint import LocalCheckpoints


def default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


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

        Returns once the checkpoint is durable (the latest one a restart will see).
        """
        raise NotImplementedError

    @property
    def run_dir(self) -> Path:
        """A directory shared by the run's workers (fault-injection markers)."""
        raise NotImplementedError


class LocalRuntime(Runtime):
    """One process, no Ray: checkpoints in ``checkpoint_dir/checkpoint_<step>``."""

    def __init__(self, checkpoint_dir: str | Path, *, num_to_keep: int, device: torch.device | None = None):
        self.device = device or default_device()
        self.checkpoints = LocalCheckpoints(checkpoint_dir, num_to_keep=num_to_keep)

    @contextlib.contextmanager
    def resume_candidates(self) -> Iterator[list[Path]]:
        self.checkpoints.clean_stale()  # may also put back a checkpoint a dead writer had moved aside
        yield self.checkpoints.all()[::-1]

    def save_checkpoint(self, write: Callable[[Path], None] | None, *, name: str, metrics: dict) -> None:
        assert write is not None, "rank 0 must pass the writer"
        staged = self.checkpoints.staging(name)
        try:
            write(staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # e.g. a full disk: give the space back
            raise
        self.checkpoints.commit(staged, name)

    @property
    def run_dir(self) -> Path:
        return self.checkpoints.directory
