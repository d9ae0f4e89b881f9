"""Checkpoint writes off the critical path.

``CheckpointWriter`` runs each write (serialise, upload, commit) in a background thread, at most one in
flight; the caller hands it a CPU copy of the state (``cpu_copy``, taken synchronously, so training may
change its tensors at once) and ``flush`` waits for the write in flight (before the next one, at the end
of a run) and re-raises its error. The runtimes own one (pipeline/runtime.py); the file format and
atomic commit are pipeline/checkpoint.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a CPU copy of its own (plain containers recursed): what a
    background writer may serialise while training goes on changing the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Runs checkpoint writes in a background thread, one at a time (module doc).

    ``submit(fn)`` first waits for the write in flight (so at most one exists, and checkpoints commit
    in order), then starts ``fn`` in a new thread and returns. ``flush()`` waits for the write in flight
    and raises its exception, if it failed. ``background=False`` runs ``fn`` in the caller (the old,
    blocking behaviour; benchmarks/train.py compares the two).
    """

    def __init__(self, *, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.waited_s = 0.0  # time callers spent blocked in submit/flush waiting for a write in flight

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by flush
            log.exception("background checkpoint write failed")
            self._error = e

    def submit(self, fn: Callable[[], Any]) -> None:
        self.flush()
        if not self.background:
            fn()
            return
        self._thread = threading.Thread(target=self._run, args=(fn,), name="checkpoint-writer", daemon=False)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def flush(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            start = time.perf_counter()
            thread.join()
            self.waited_s += time.perf_counter() - start
        error, self._error = self._error, None
        if error is not None:
            raise error  # the writer's own exception (a full disk stays an OSError naming its file)
