"""Training metrics averaged over the steps since the last log line, and the steady throughput.

Each log line closes a window: the mean bits/dim, regularizer and gradient norm of its finite steps
(skipped, non-finite steps are only counted), and images/s over its wall time, for all workers
together and per worker (data-parallel workers move in lockstep, so rank 0's clock times them all).
Throughput for the run (``images_per_s``) leaves out the first window, which holds start-up costs
(loader processes, lazy initialisation), and the loop restarts the clock after evaluations and
checkpoints, so it measures training alone.
"""

from __future__ import annotations

import math
import time

from pipeline.step import StepResult


class MetricWindow:
    def __init__(self, *, images_per_step: int, first_window_steps: int, workers: int = 1) -> None:
        self.images_per_step = images_per_step
        self.workers = workers
        self.first_window_steps = first_window_steps
        self._steady_images, self._steady_seconds = 0, 0.0
        self._reset()

    def _reset(self) -> None:
        self.sums = {"bits_per_dim": 0.0, "regularizer": 0.0, "grad_norm": 0.0}
        self.finite, self.skipped = 0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def add(self, result: StepResult) -> None:
        if result.skipped:
            self.skipped += 1
            return
        self.finite += 1
        self.sums["bits_per_dim"] += result.bits_per_dim
        self.sums["regularizer"] += result.regularizer
        self.sums["grad_norm"] += result.grad_norm

    def close(self, step: int, *, lr: float, skipped_total: int) -> tuple[dict[str, float], str]:
        """(metrics for MLflow, the log line's text) of the window ending at ``step``; starts the next."""
        seconds = max(time.perf_counter() - self._clock, 1e-9)
        images = (self.finite + self.skipped) * self.images_per_step
        if step > self.first_window_steps:
            self._steady_images += images
            self._steady_seconds += seconds
        metrics = {f"train/{name}": total / self.finite for name, total in self.sums.items() if self.finite}
        metrics |= {
            "train/images_per_s": images / seconds,
            "train/images_per_s_per_worker": images / seconds / self.workers,
            "train/lr": lr,
            "train/skipped_steps": float(skipped_total),
        }
        bpd = f"{metrics['train/bits_per_dim']:.4f}" if self.finite else "nan"
        text = f"bits/dim {bpd} | {images / seconds:.1f} images/s | lr {lr:.2e}"
        text += f" | skipped {self.skipped}" if self.skipped else ""
        self._reset()
        return metrics, text

    @property
    def images_per_s(self) -> float:
        """Steady training throughput over the run so far (nan before the second window closes)."""
        return self._steady_images / self._steady_seconds if self._steady_seconds else math.nan
