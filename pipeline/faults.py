"""Test-only fault injection for the training loop: a worker that dies at a step, losses that go NaN.

Not part of any experiment file: a test passes ``Faults(...)`` to ``pipeline.loop.fit`` (or to
``pipeline.ray_adapter.fit_with_ray``, which hands it to every worker). The default ``NO_FAULTS``
does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.runtime import Runtime


class InjectedFault(RuntimeError):
    """Raised by ``Faults(fail_at_step=...)``."""


@dataclass(frozen=True, kw_only=True)
class Faults:
    """fail_at_step: raise ``InjectedFault`` once, in the last rank, right before that step (1-based);
    a marker file in the run's shared directory keeps it from firing again after the restart.
    nan_loss_from_step: replace the loss by NaN from that step on. 0 = off."""

    fail_at_step: int = 0
    nan_loss_from_step: int = 0

    def before_step(self, step: int, runtime: Runtime) -> None:
        if self.fail_at_step != step or runtime.rank != runtime.world_size - 1:
            return
        marker = runtime.run_dir / f".fault-injected-step{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFault(f"Faults(fail_at_step={step}): injected worker failure in rank {runtime.rank}")

    def poisons(self, step: int) -> bool:
        """Whether the loss of ``step`` (1-based) is to be replaced by NaN."""
        return 0 < self.nan_loss_from_step <= step


NO_FAULTS = Faults()
