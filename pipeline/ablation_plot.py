"""The ablation's picture: each variant's paired difference to the reference, with its 95% interval.

One row per variant (the reference itself is the dashed zero line). Read it like the table: an
interval that crosses zero is a difference these seeds do not resolve, one left of zero is a variant
that beats the reference in test bits/dim (lower is better). The seed-to-seed spread of the plain
means is much larger than these intervals (a seed moves every variant together), which is why the
picture shows the paired differences and not the means.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_paired_differences(summary: list[dict[str, object]], path: Path, title: str = "") -> Path | None:
    """Write the interval plot of ``summarize``'s rows to ``path`` (PNG); None if nothing is paired."""
    paired = [r for r in summary if not math.isnan(float(r["diff_vs_reference"]))]  # type: ignore[arg-type]
    if not paired:
        return None
    reference = paired[0]["reference"]
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(paired) + 1.4))
    for i, row in enumerate(reversed(paired)):
        diff, half = float(row["diff_vs_reference"]), float(row["diff_ci95"])  # type: ignore[arg-type]
        resolved = not math.isnan(half) and abs(diff) > half
        color = ("tab:green" if diff < 0 else "tab:red") if resolved else "tab:gray"
        ax.errorbar(diff, i, xerr=None if math.isnan(half) else half, fmt="o", color=color, capsize=4)
        ax.annotate(f"{diff:+.3f}", (diff, i), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8)  # fmt: skip
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(paired)), [f"{r['variant']} (n={r['seeds']})" for r in reversed(paired)])
    ax.set_xlabel(f"test bits/dim minus {reference}'s at the same seed (95% CI; lower: better)")
    ax.set_title(f"{title}: paired against {reference}" if title else f"paired against {reference}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
