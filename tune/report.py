"""The search's results: one row per trial, a CSV table and three plots for the parent MLflow run.

A row holds the trial's last reported test bits/dim (what ASHA compared), its best one, how it ended
(``completed``, ``stopped_early`` by ASHA, ``error``, or ``unfinished`` after an interruption) and the
values of the searched fields plus the ones the plots need (sigma, depth, learning rate, regularizer),
taken from the base config where the space does not set them.

Plots (matplotlib, Agg backend, no display needed): test bits/dim against sigma (log scale) and against
depth (steps per level, one series per number of levels), hollow markers for trials stopped early;
learning curves (test bits/dim per step, from the trials' MLflow runs) of the best completed trials.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

PLOTTED_FIELDS = (
    "loss.sigma",
    "model.num_steps",
    "model.num_levels",
    "optim.lr",
    "model.split.regularizer",
)
STATUSES = ("completed", "stopped_early", "error", "unfinished")
TABLE_NAME = "trials.csv"
PLOT_NAMES = ("bpd_vs_sigma.png", "bpd_vs_depth.png", "learning_curves.png")


@dataclass(kw_only=True)
class TrialRow:
    trial_id: str
    status: str
    step: int
    test_bits_per_dim: float
    best_test_bits_per_dim: float
    mlflow_run_id: str
    values: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "status": self.status,
            "step": self.step,
            "test_bits_per_dim": self.test_bits_per_dim,
            "best_test_bits_per_dim": self.best_test_bits_per_dim,
            **self.values,
            "mlflow_run_id": self.mlflow_run_id,
        }


def trial_status(tune_status: str, step: int, total_steps: int) -> str:
    """How a trial ended, in the table's words (Tune says TERMINATED for both completed and stopped)."""
    if tune_status == "ERROR":
        return "error"
    if tune_status != "TERMINATED":
        return "unfinished"
    return "completed" if step >= total_steps else "stopped_early"


def make_row(
    *,
    trial_id: str,
    tune_status: str,
    results: Sequence[dict[str, Any]],
    config: dict[str, Any],
    defaults: dict[str, Any],
    keys: Sequence[str],
    metric: str,
    total_steps: int,
) -> TrialRow:
    """``results``: the trial's reports in order; ``config``: its sampled values and ``defaults`` the
    base config's, both by dotted key."""
    reported = [r for r in results if isinstance(r.get(metric), int | float)]
    last = reported[-1] if reported else {}
    finite = [float(r[metric]) for r in reported if math.isfinite(r[metric])]
    step = int(last.get("step", 0))
    values = {key: config[key] if key in config else defaults[key] for key in keys}
    return TrialRow(
        trial_id=trial_id,
        status=trial_status(tune_status, step, total_steps),
        step=step,
        test_bits_per_dim=float(last.get(metric, math.nan)),
        best_test_bits_per_dim=min(finite) if finite else math.nan,
        mlflow_run_id=str(
            next((r["mlflow_run_id"] for r in reversed(results) if r.get("mlflow_run_id")), "")
        ),
        values=values,
    )


def ranked(rows: Sequence[TrialRow], *, mode: str = "min") -> list[TrialRow]:
    """Completed trials with a finite final value, best first."""
    done = [r for r in rows if r.status == "completed" and math.isfinite(r.test_bits_per_dim)]
    return sorted(done, key=lambda r: r.test_bits_per_dim, reverse=mode == "max")


def write_table(rows: Sequence[TrialRow], path: Path) -> Path:
    records = [r.as_dict() for r in sorted(rows, key=lambda r: r.trial_id)]
    columns = list(records[0]) if records else ["trial_id", "status", "step", "test_bits_per_dim"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def _scatter(ax: Any, rows: Sequence[TrialRow], x_of: Any, label: str | None, color: str) -> None:
    """Completed trials filled, trials stopped early hollow (their value is from an earlier step)."""
    for status, face in (("completed", color), ("stopped_early", "none")):
        chosen = [r for r in rows if r.status == status and math.isfinite(r.test_bits_per_dim)]
        if chosen:
            ax.scatter(
                [x_of(r) for r in chosen],
                [r.test_bits_per_dim for r in chosen],
                label=f"{label}, {status}" if label else status,
                facecolors=face,
                edgecolors=color,
            )


def plot_vs_sigma(rows: Sequence[TrialRow], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    _scatter(ax, rows, lambda r: float(r.values["loss.sigma"]), None, "C0")
    ax.set_xscale("log")
    ax.set_xlabel("shuffle regularization strength sigma")
    ax.set_ylabel("test bits/dim (last report)")
    ax.set_title("test bits/dim against sigma")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_vs_depth(rows: Sequence[TrialRow], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    levels = sorted({int(r.values["model.num_levels"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(levels):
        chosen = [r for r in rows if int(r.values["model.num_levels"]) == n]
        _scatter(
            ax, chosen, lambda r: int(r.values["model.num_steps"]), f"{n} levels", colors[i % len(colors)]
        )
    ax.set_xlabel("depth: flow steps per level")
    ax.set_ylabel("test bits/dim (last report)")
    ax.set_title("test bits/dim against depth")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """``curves``: label -> [(step, test bits/dim)], best trial first."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("test bits/dim")
    ax.set_title("learning curves of the best trials")
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
