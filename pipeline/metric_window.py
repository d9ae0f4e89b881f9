"""Training metrics averaged over the steps since the last log line, and the steady throughput.

Each log line closes a window: the mean bits/dim, regularizer and gradient norm of its finite steps
(skipped, non-finite steps are only counted), and images/s over its wall time, for all workers
together and per worker (data-parallel workers move in lockstep, so rank 0's clock times them all).
The sums stay on the device (``add`` reads nothing back: no host synchronisation on ordinary steps);
``close`` reads them once. Throughput for the run (``images_per_s``) leaves out the first window,
which holds start-up costs (loader processes, lazy initialisation, compilation), and the loop restarts
the clock after evaluations and checkpoints, so it measures training alone.
"""

from __future__ import annotations

import math
import time

import torch

from pipeline.step import StepResult

NAMES = ("bits_per_dim", "regularizer", "grad_norm")


class MetricWindow:
    def __init__(self, *, images_per_step: int, first_window_steps: int, workers: int = 1) -> None:
        self.images_per_step = images_per_step
        self.workers = workers
        self.first_window_steps = first_window_steps
        self._steady_images, self._steady_seconds = 0, 0.0
        self._reset()

    def _reset(self) -> None:
        # sums of (bits/dim, regularizer, grad norm) over finite steps, then finite and skipped counts
        self._totals: torch.Tensor | None = None
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def add(self, result: StepResult) -> None:
        kept = ~result.skipped
        values = torch.stack([result.bits_per_dim, result.regularizer, result.grad_norm]).double()
        row = torch.cat([torch.where(kept, values, 0.0), torch.stack([kept, ~kept]).double()])
        self._totals = row if self._totals is None else self._totals + row
        self.steps += 1

    def close(self, step: int, *, lr: float, skipped_total: int) -> tuple[dict[str, float], str]:
        """(metrics for MLflow, the log line's text) of the window ending at ``step``; starts the next."""
        totals = self._totals.tolist() if self._totals is not None else [0.0] * 5
        sums, finite, skipped = dict(zip(NAMES, totals[:3], strict=True)), int(totals[3]), int(totals[4])
        seconds = max(time.perf_counter() - self._clock, 1e-9)
        images = self.steps * self.images_per_step
        if step > self.first_window_steps:
            self._steady_images += images
            self._steady_seconds += seconds
        metrics = {f"train/{name}": total / finite for name, total in sums.items() if finite}
        metrics |= {
            "train/images_per_s": images / seconds,
            "train/images_per_s_per_worker": images / seconds / self.workers,
            "train/lr": lr,
            "train/skipped_steps": float(skipped_total),
        }
        bpd = f"{metrics['train/bits_per_dim']:.4f}" if finite else "nan"
        text = f"bits/dim {bpd} | {images / seconds:.1f} images/s | lr {lr:.2e}"
        text += f" | skipped {skipped}" if skipped else ""
        self._reset()
        return metrics, text

    @property
    def images_per_s(self) -> float:
        """Steady training throughput over the run so far (nan before the second window closes)."""
        return self._steady_images / self._steady_seconds if self._steady_seconds else math.nan
