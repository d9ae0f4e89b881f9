"""The split-strategy ablation: ``python -m pipeline.compare --config configs/compare.yaml``.

Trains every variant (static, LCMA at both ends, EIW with both regulariser forms and several sigmas)
from the same base config, for the same steps and seeds, each in one process with the plain loop, and
prints test bits/dim per variant: mean, spread over seeds, and the paired difference to ``static``
(same seed: same data order, same initial flow weights, same evaluation noise) with its 95%
t-interval, which is what tells a real effect from seed noise, beside the split diagnostics of the
final models (pipeline/ablation_report.py). Each (variant, seed) is a named run under ``run.root``,
so an interrupted comparison picks up where it stopped; every finished run is a row of
``run.root/compare/<name>-runs.csv`` and the table goes to ``run.root/compare/<name>.{md,csv}``, its
picture of the paired intervals to ``<name>.png`` (pipeline/ablation_plot.py).
``--report A.csv B.csv`` trains nothing and tabulates finished runs, e.g. two halves of the seeds run
as two processes (``--seeds 0 1 run.root=runs/a`` and ``--seeds 2 3 run.root=runs/b``); put config
overrides before ``--report``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.ablation_plot import plot_paired_differences
from pipeline.ablation_report import RunRow, append_run, read_runs, summarize, write_summary
from pipeline.config import TrainConfig, load_config, resolve
from pipeline.config_loading import ConfigModel, Overrides, as_overrides, load_file
from pipeline.logging_setup import configure_console

log = logging.getLogger("pipeline.compare")


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
        "model.init_seed": seed,  # a seed is a whole replicate: initial weights, data order, eval noise
        "ray.enabled": False,
        "ray.num_workers": 1,
        **as_overrides(extra),
    }
    return resolve(load_config(comparison.base, overrides))


def run_all(
    comparison: Comparison, configs: dict[tuple[str, int], TrainConfig], runs_csv: Path
) -> list[RunRow]:
    """Train (or resume) every (variant, seed) run in turn; each finished run is appended to
    ``runs_csv`` at once, so an interrupted comparison loses no finished result."""
    from pipeline.data import ensure_data
    from pipeline.loop import fit

    for data, image_shape in {(cfg.data, cfg.model.image_shape) for cfg in configs.values()}:
        ensure_data(data, image_shape)  # once per data set, not once per run
    rows = []
    for i, ((variant, seed), cfg) in enumerate(configs.items(), start=1):
        log.info("[%d/%d] %s seed %d", i, len(configs), variant, seed)
        result = fit(cfg)
        row = RunRow(
            variant=variant,
            seed=seed,
            test_bits_per_dim=result.test_bits_per_dim,
            diagnostics=result.diagnostics,
            steps=result.step,
        )
        append_run(runs_csv, row)
        rows.append(row)
    return rows


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
        "--reference", default="static", help="the variant every other is paired against (default static)"
    )
    parser.add_argument(
        "--report",
        nargs="*",
        default=None,
        metavar="RUNS_CSV",
        help="train nothing: tabulate the per-run results in these CSVs (default: this comparison's "
        "run.root/compare/<name>-runs.csv), e.g. halves of the seeds run in two processes",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides applied to every run"
    )
    args = parser.parse_args(argv)
    configure_console()
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

    out_dir = Path(next(iter(configs.values())).run.root) / "compare"
    if args.report is not None:  # tabulate finished runs (e.g. halves run on two machines)
        try:
            rows = read_runs(args.report or [out_dir / f"{comparison.name}-runs.csv"])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not rows:
            print("error: --report: no finished runs in the given files", file=sys.stderr)
            return 2
    else:
        rows = run_all(comparison, configs, out_dir / f"{comparison.name}-runs.csv")
    if args.reference not in comparison.variants:
        print(f"error: --reference: unknown variant {args.reference!r}", file=sys.stderr)
        return 2
    try:
        summary = summarize(rows, list(comparison.variants), reference_variant=args.reference)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = write_summary(out_dir, comparison.name, summary)
    picture = plot_paired_differences(summary, out_dir / f"{comparison.name}.png", comparison.name)
    print(table, end="")
    print(f"written to {out_dir}/{comparison.name}.md and .csv" + (" and .png" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
