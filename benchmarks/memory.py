"""Memory measurements shared by the benchmark scripts (``from benchmarks.memory import ...``).

Two numbers per training step:
- saved for backward: the bytes of the unique storages autograd keeps between forward and backward,
  counted with ``saved_tensors_hooks``. Exact and allocator-independent; it is the part of a step's
  memory that grows with batch and image size.
- peak: on CUDA, ``max_memory_allocated`` during one step above what was allocated before it; on the
  CPU, the growth of the process's peak RSS (``ru_maxrss``) over its RSS after a warm-up step, which
  also depends on what glibc's allocator kept from earlier steps.
Run each model in a fresh process for the peak (``benchmarks.common.run_child``): RSS never shrinks back.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch


def saved_for_backward_mib(
    loss_fn: Callable[[], torch.Tensor], *, exclude_parameters_of: torch.nn.Module | None = None
) -> float:
    """Runs ``loss_fn()`` under autograd's saved-tensor hooks, then its backward; MiB kept between.
    ``exclude_parameters_of``: leave out that module's parameter storages (they exist anyway)."""
    params = set()
    if exclude_parameters_of is not None:
        params = {p.untyped_storage().data_ptr() for p in exclude_parameters_of.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values()) / 2**20


def step_peak_mib(step: Callable[[], None], device: str) -> float:
    """Peak memory of ``step()`` in MiB (see the module doc); call after a warm-up step."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    for _ in range(2):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20


def activations_mib(model: torch.nn.Module, loss_fn) -> float:
    """Like ``saved_for_backward_mib`` but without the parameters' storages (they exist anyway)."""
    return saved_for_backward_mib(loss_fn, exclude_parameters_of=model)
