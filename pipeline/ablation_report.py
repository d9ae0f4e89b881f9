"""The ablation's statistics: per-run rows, paired differences with t-intervals, one markdown table.

A comparison trains every variant at the same seeds; a seed fixes the flow's initial weights (shared
by every split strategy), the data order and the evaluation noise, so the difference of two variants
at one seed is a paired measurement. The table reports, per variant, the mean over seeds of
``variant - reference`` with its 95% Student-t interval (n - 1 degrees of freedom): an interval that
excludes 0 is a difference these seeds resolve, one that contains 0 is not (it says nothing about
smaller effects). Per-run rows (variant, seed, steps, test bits/dim, the split diagnostics of the
final model) go to a CSV as each run finishes, so tables from several machines or halves can be
merged; rows of runs of different lengths are refused, since pairing a 1,000-step run with a
4,000-step one measures the length, not the strategy.
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
# Diagnostics shown in the table, averaged over seeds, one value per split ("split 0 / split 1"):
# the splits behave differently (the Shuffle's order can freeze at one width and churn at another).
TABLE_DIAGNOSTICS = ("churn", "kept_changes", "kendall_tau", "w_entropy", "static_overlap")


@dataclass(kw_only=True)
class RunRow:
    variant: str
    seed: int
    test_bits_per_dim: float
    diagnostics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None  # optimizer steps of the run; None in files written before it was kept


def append_run(path: Path, row: RunRow) -> None:
    """Add one finished run to the per-run CSV (diagnostics as ``diag/<name>`` columns)."""
    rows = read_runs([path]) if path.exists() else []
    rows = [r for r in rows if (r.variant, r.seed) != (row.variant, row.seed)] + [row]
    columns = ["variant", "seed", "steps", "test_bits_per_dim"]
    columns += sorted({f"diag/{k}" for r in rows for k in r.diagnostics})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"variant": r.variant, "seed": r.seed, "steps": "" if r.steps is None else r.steps}
                | {"test_bits_per_dim": repr(r.test_bits_per_dim)}
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
                            steps=int(record["steps"]) if record.get("steps") not in ("", None) else None,
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


def _per_split_diagnostic(rows: list[RunRow], name: str) -> list[float]:
    """The seed-mean of ``split<i>/<name>`` for each split i in order (empty if no run has it)."""
    by_split: dict[int, list[float]] = {}
    for r in rows:
        for key, value in r.diagnostics.items():
            prefix, _, diagnostic = key.rpartition("/")
            if diagnostic == name and prefix.startswith("split") and prefix[5:].isdigit():
                by_split.setdefault(int(prefix[5:]), []).append(value)
    return [statistics.fmean(by_split[i]) for i in sorted(by_split)]


def _check_one_length(rows: list[RunRow]) -> None:
    lengths = sorted({r.steps for r in rows if r.steps is not None})
    if len(lengths) > 1:
        examples = {n: next(f"{r.variant} seed {r.seed}" for r in rows if r.steps == n) for n in lengths}
        raise ValueError(
            "the per-run rows mix runs of different lengths ("
            + ", ".join(f"{n} steps: e.g. {where}" for n, where in examples.items())
            + "); tabulate each length on its own"
        )


def summarize(
    rows: list[RunRow], variants: list[str] | None = None, *, reference_variant: str = REFERENCE_VARIANT
) -> list[dict[str, object]]:
    """Per variant (in ``variants`` order, else first-seen): seeds, mean, std, the paired difference
    to ``reference_variant`` with its 95% t-interval, per-seed values and mean diagnostics (also per
    split, as ``<name>_per_split``). Raises ``ValueError`` for rows of runs of different lengths."""
    _check_one_length(rows)
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
            "steps": next((r.steps for r in mine if r.steps is not None), None),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "reference": reference_variant,
            "diff_vs_reference": diff,
            "diff_ci95": half,
            "per_seed": " ".join(f"{v:.4f}" for v in values),
        }
        summary.update({name: _mean_diagnostic(mine, name) for name in TABLE_DIAGNOSTICS})
        summary.update({f"{n}_per_split": _per_split_diagnostic(mine, n) for n in TABLE_DIAGNOSTICS})
        table.append(summary)
    return table


def _fmt(value: object, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def _fmt_splits(row: dict[str, object], name: str, spec: str) -> str:
    """``split 0 / split 1 / ...`` values of one diagnostic, or its plain mean if no run has splits."""
    per_split = row.get(f"{name}_per_split") or []
    if per_split:
        return " / ".join(_fmt(v, spec) for v in per_split)  # type: ignore[union-attr]
    return _fmt(row[name], spec)


def markdown_table(summary: list[dict[str, object]]) -> str:
    reference = summary[0]["reference"] if summary else REFERENCE_VARIANT
    lines = [
        f"| variant | seeds | test bits/dim | std | vs {reference} (paired, 95% CI) | churn (per split) "
        "| kept-set changes | Kendall tau | entropy of w | static overlap | per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        diff = "-"
        if not math.isnan(r["diff_vs_reference"]):
            diff = f"{r['diff_vs_reference']:+.4f} ± {_fmt(r['diff_ci95'], '.4f')}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['mean']:.4f} | {_fmt(r['std'], '.4f')} | {diff} | "
            f"{_fmt_splits(r, 'churn', '.3f')} | {_fmt_splits(r, 'kept_changes', '.1f')} | "
            f"{_fmt_splits(r, 'kendall_tau', '.2f')} | {_fmt_splits(r, 'w_entropy', '.2f')} | "
            f"{_fmt_splits(r, 'static_overlap', '.2f')} | {r['per_seed']} |"
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
        for row in summary:  # per-split lists as "a / b", like the markdown
            writer.writerow({k: " / ".join(map(repr, v)) if isinstance(v, list) else v
                             for k, v in row.items()})  # fmt: skip
    return table
