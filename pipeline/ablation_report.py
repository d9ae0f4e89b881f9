"""The ablation's statistics: per-run rows, paired differences with t-intervals, one markdown table.

A comparison trains every variant at the same seeds; a seed fixes the flow's initial weights (shared
by every split strategy), the data order and the evaluation noise, so the difference of two variants
at one seed is a paired measurement. The table reports, per variant, the mean over seeds of
``variant - reference`` with its 95% Student-t interval (n - 1 degrees of freedom): an interval that
excludes 0 is a difference these seeds resolve, one that contains 0 is not (it says nothing about
smaller effects). Per-run rows (variant, seed, test bits/dim, the split diagnostics of the final
model) go to a CSV as each run finishes, so tables from several machines or halves can be merged.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

REFERENCE_VARIANT = "static"
# Diagnostics shown in the table, averaged over seeds (and over splits for the per-split names).
TABLE_DIAGNOSTICS = ("churn", "kept_changes", "kendall_tau", "w_entropy", "static_overlap")


@dataclass(kw_only=True)
class RunRow:
    variant: str
    seed: int
    test_bits_per_dim: float
    diagnostics: dict[str, float] = field(default_factory=dict)


def append_run(path: Path, row: RunRow) -> None:
    """Add one finished run to the per-run CSV (diagnostics as ``diag/<name>`` columns)."""
    rows = read_runs([path]) if path.exists() else []
    rows = [r for r in rows if (r.variant, r.seed) != (row.variant, row.seed)] + [row]
    columns = ["variant", "seed", "test_bits_per_dim"]
    columns += sorted({f"diag/{k}" for r in rows for k in r.diagnostics})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"variant": r.variant, "seed": r.seed, "test_bits_per_dim": repr(r.test_bits_per_dim)}
                | {f"diag/{k}": repr(v) for k, v in r.diagnostics.items()}
            )
    tmp.replace(path)


def read_runs(paths: Iterable[Path]) -> list[RunRow]:
    """Per-run rows from one or more CSVs written by ``append_run``; a later file wins on (variant, seed)."""
    by_key: dict[tuple[str, int], RunRow] = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                for line, record in enumerate(csv.DictReader(f), start=2):
                    try:
                        row = RunRow(
                            variant=record["variant"],
                            seed=int(record["seed"]),
                            test_bits_per_dim=float(record["test_bits_per_dim"]),
                            diagnostics={
                                k.removeprefix("diag/"): float(v)
                                for k, v in record.items()
                                if k.startswith("diag/") and v not in ("", None)
                            },
                        )
                    except (KeyError, TypeError, ValueError) as e:
                        raise ValueError(f"{path}: line {line}: not a run row ({e})") from e
                    by_key[(row.variant, row.seed)] = row
        except OSError as e:
            raise ValueError(f"{path}: cannot read the per-run results: {e.strerror or e}") from e
    return list(by_key.values())


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t interval; half-width NaN for fewer than 2."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem


def _mean_diagnostic(rows: list[RunRow], name: str) -> float:
    values = [v for r in rows for k, v in r.diagnostics.items() if k.rsplit("/", 1)[-1] == name]
    return statistics.fmean(values) if values else math.nan


def summarize(
    rows: list[RunRow], variants: list[str] | None = None, *, reference_variant: str = REFERENCE_VARIANT
) -> list[dict[str, object]]:
    """Per variant (in ``variants`` order, else first-seen): seeds, mean, std, the paired difference
    to ``reference_variant`` with its 95% t-interval, per-seed values and mean diagnostics."""
    order = variants or list(dict.fromkeys(r.variant for r in rows))
    reference = {r.seed: r.test_bits_per_dim for r in rows if r.variant == reference_variant}
    table = []
    for variant in order:
        mine = sorted((r for r in rows if r.variant == variant), key=lambda r: r.seed)
        if not mine:
            continue
        values = [r.test_bits_per_dim for r in mine]
        diffs = [r.test_bits_per_dim - reference[r.seed] for r in mine if r.seed in reference]
        diff, half = t_interval(diffs) if diffs and variant != reference_variant else (math.nan, math.nan)
        summary: dict[str, object] = {
            "variant": variant,
            "seeds": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "reference": reference_variant,
            "diff_vs_reference": diff,
            "diff_ci95": half,
            "per_seed": " ".join(f"{v:.4f}" for v in values),
        }
        summary.update({name: _mean_diagnostic(mine, name) for name in TABLE_DIAGNOSTICS})
        table.append(summary)
    return table


def _fmt(value: object, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def markdown_table(summary: list[dict[str, object]]) -> str:
    reference = summary[0]["reference"] if summary else REFERENCE_VARIANT
    lines = [
        f"| variant | seeds | test bits/dim | std | vs {reference} (paired, 95% CI) | churn "
        "| kept-set changes | Kendall tau | entropy of w | static overlap | per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        diff = "-"
        if not math.isnan(r["diff_vs_reference"]):
            diff = f"{r['diff_vs_reference']:+.4f} ± {_fmt(r['diff_ci95'], '.4f')}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['mean']:.4f} | {_fmt(r['std'], '.4f')} | {diff} | "
            f"{_fmt(r['churn'], '.3f')} | {_fmt(r['kept_changes'], '.1f')} | "
            f"{_fmt(r['kendall_tau'], '.2f')} | {_fmt(r['w_entropy'], '.2f')} | "
            f"{_fmt(r['static_overlap'], '.2f')} | {r['per_seed']} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, name: str, summary: list[dict[str, object]]) -> str:
    """``<name>.md`` and ``<name>.csv`` under ``out_dir``; returns the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    (out_dir / f"{name}.md").write_text(table)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return table
