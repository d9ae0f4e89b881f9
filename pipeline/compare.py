"""The split-strategy ablation: ``python -m pipeline.compare --config configs/compare.yaml``.

Trains every variant (static, LCMA at both ends, EIW with both regulariser forms and several sigmas)
from the same base config, for the same steps and seeds, each in one process with the plain loop, and
prints test bits/dim per variant: mean, spread over seeds, and the paired difference to ``static``
(same seed, same data order, same initial flow weights), which is what tells a real effect from
seed noise. Each (variant, seed) is a named run under ``run.root``, so an interrupted comparison
picks up where it stopped; the table also goes to ``runs/compare/<name>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import TrainConfig, load_config, resolve
from pipeline.config_loading import ConfigModel, Overrides, as_overrides, load_file

log = logging.getLogger("pipeline.compare")

REFERENCE_VARIANT = "static"


class Comparison(ConfigModel):
    """A comparison file: a base experiment, overrides shared by every run, seeds, and named variants,
    each a mapping of dotted config keys to values (applied as typed values, like the overrides).

    ``name`` (default: the file's name) names the runs ``<name>-<variant>-seed<seed>`` and the table.
    """

    name: str = ""
    base: str = "configs/sample.yaml"
    overrides: dict[str, Any] = {}
    seeds: list[int] = Field([0], min_length=1)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)


def load_comparison(path: str | Path) -> Comparison:
    """Parse and validate a comparison YAML; every variant must build a valid TrainConfig."""
    comparison = load_file(Comparison, path)
    if not comparison.name:
        comparison = comparison.model_copy(update={"name": Path(path).stem})
    for variant in comparison.variants:  # fail before hours of training, naming the variant
        try:
            config_for(comparison, variant, comparison.seeds[0])
        except ValueError as e:
            raise ValueError(f"{path}: variants.{variant}: {e}") from e
    return comparison


def config_for(comparison: Comparison, variant: str, seed: int, extra: Overrides = ()) -> TrainConfig:
    """The resolved config of one (variant, seed) run: base file + shared overrides + the variant's +
    this run's name and seed + ``extra`` (the command line's), in one process without Ray."""
    overrides = {
        **comparison.overrides,
        **comparison.variants[variant],
        "run.name": f"{comparison.name}-{variant}-seed{seed}",
        "run.seed": seed,
        "ray.enabled": False,
        "ray.num_workers": 1,
        **as_overrides(extra),
    }
    return resolve(load_config(comparison.base, overrides))


def summarize(results: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """Per variant: mean and sample std over seeds, and the mean paired difference to static."""
    reference = results.get(REFERENCE_VARIANT, {})
    rows = []
    for variant, by_seed in results.items():
        values = [by_seed[s] for s in sorted(by_seed)]
        diffs = [by_seed[s] - reference[s] for s in sorted(by_seed) if s in reference]
        rows.append(
            {
                "variant": variant,
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                "diff_vs_static": statistics.fmean(diffs)
                if diffs and variant != REFERENCE_VARIANT
                else math.nan,
                "diff_std": statistics.stdev(diffs)
                if len(diffs) > 1 and variant != REFERENCE_VARIANT
                else math.nan,
                "per_seed": " ".join(f"{v:.4f}" for v in values),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | seeds | test bits/dim (mean) | std over seeds | paired diff vs static | std of diff "
        "| per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "-" if math.isnan(r["diff_vs_static"]) else f"{r['diff_vs_static']:+.4f}"
        diff_std = "-" if math.isnan(r["diff_std"]) else f"{r['diff_std']:.4f}"
        std = "-" if math.isnan(r["std"]) else f"{r['std']:.4f}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['mean']:.4f} | {std} | {diff} | {diff_std} | "
            f"{r['per_seed']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Train static, LCMA and EIW variants on the same data, steps and seeds; "
        "print test bits/dim per variant with the spread over seeds.",
    )
    parser.add_argument("--config", default="configs/compare.yaml", help="comparison YAML")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="only these seeds")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides applied to every run"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        comparison = load_comparison(args.config)
        variants = args.variants or list(comparison.variants)
        missing = [v for v in variants if v not in comparison.variants]
        if missing:
            raise ValueError(f"--variants: unknown {missing[0]!r} (known: {', '.join(comparison.variants)})")
        seeds = args.seeds or comparison.seeds
        configs = {(v, s): config_for(comparison, v, s, args.overrides) for v in variants for s in seeds}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pipeline.data import ensure_data
    from pipeline.loop import fit

    for data, image_shape in {(cfg.data, cfg.model.image_shape) for cfg in configs.values()}:
        ensure_data(data, image_shape)  # once per data set, not once per run
    results: dict[str, dict[int, float]] = {v: {} for v in variants}
    for i, ((variant, seed), cfg) in enumerate(configs.items(), start=1):
        log.info("[%d/%d] %s seed %d", i, len(configs), variant, seed)
        results[variant][seed] = fit(cfg).test_bits_per_dim

    rows = summarize(results)
    table = markdown_table(rows)
    out_dir = Path(next(iter(configs.values())).run.root) / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{comparison.name}.md").write_text(table)
    with open(out_dir / f"{comparison.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(table, end="")
    print(f"written to {out_dir}/{comparison.name}.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
