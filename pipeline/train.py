"""``python -m pipeline.train --config configs/<name>.yaml [section.key=value ...]``

Runs on Ray Train by default: an embedded local Ray, or the cluster of ``ray job submit`` /
$RAY_ADDRESS / ``ray.address``. ``--no-ray`` (or ``ray.enabled=false``) runs the plain loop in this
process. Re-running with the same ``run.name`` resumes from its latest checkpoint and continues its
MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from pipeline.config import TrainConfig, config_to_yaml, load_config, resolve
from pipeline.logging_setup import configure_console

if TYPE_CHECKING:
    from pipeline.loop import FitResult

log = logging.getLogger("pipeline.train")

EPILOG = """\
overrides: any config key as section.key=value (YAML values), e.g.
  run.name=try2 optim.lr=3e-4 ray.num_workers=4 model.split.strategy=static run.epochs=1

sections: model (flows.FlowConfig), data, optim, run, mlflow, ray; see pipeline/config.py.
examples:
  python -m pipeline.train --config configs/sample.yaml
  python -m pipeline.train --config configs/tiny.yaml --no-ray
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipeline.train \\
      --config configs/tiny.yaml run.root=$PWD/runs data.root=$PWD/data/sample-32-tiny
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train an EIW-Flow / Glow / LCMA flow on WebDataset shards with Ray Train and MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help="experiment YAML (default: pipeline/config.py defaults)"
    )
    parser.add_argument("--no-ray", action="store_true", help="run the plain loop in this process (no Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def run(cfg: TrainConfig) -> FitResult:
    """Train ``cfg`` (already resolved): check (or build) the shards once, here, then the plain loop or
    Ray Train (imported here: checking a config needs neither Ray nor MLflow)."""
    from pipeline.data import ensure_data

    ensure_data(cfg.data, cfg.model.image_shape)
    if cfg.ray.enabled:
        from pipeline.ray_adapter import fit_with_ray

        return fit_with_ray(cfg)
    from pipeline.loop import fit

    return fit(cfg)


def warn_if_ephemeral(raw: TrainConfig, cfg: TrainConfig) -> None:
    """Under ``ray job submit`` the driver runs in an unpacked copy of the working dir, which Ray
    deletes with the session: relative roots would put checkpoints and the MLflow store there."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ or "runtime_resources" not in os.getcwd():
        return
    roots = (("run.root", raw.run.root), ("data.root", raw.data.root))
    relative = [f"{k}={v}" for k, v in roots if not (os.path.isabs(v) or "://" in v)]  # URIs: buckets
    if relative:
        log.warning(
            "running from Ray's uploaded working dir %s: %s resolve inside it and vanish with the Ray "
            "session; pass absolute paths (e.g. run.root=$PWD/runs data.root=$PWD/data/...) or set "
            "MLFLOW_TRACKING_URI to a server",
            os.getcwd(),
            ", ".join(relative),
        )


def environment_error(exc: BaseException) -> str | None:
    """One line for an OS error or an unreachable object store in ``exc`` or its causes (Ray wraps a
    worker's error), naming the file or endpoint; None when the failure is something else."""
    from data_prep.cli import error_line

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return error_line(exc)
        if type(exc).__module__.startswith("botocore") and "Connection" in type(exc).__name__:
            return one_line(f"object storage unreachable: {exc}")
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_console()
    overrides = list(args.overrides) + (["ray.enabled=false"] if args.no_ray else [])
    try:
        raw = load_config(args.config, overrides)
        cfg = resolve(raw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_if_ephemeral(raw, cfg)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    log.info(
        "run %s: %d steps, model %s split, MLflow at %s",
        cfg.run.name,
        cfg.total_steps,
        cfg.model.split.strategy,
        cfg.mlflow.tracking_uri,
    )
    try:
        result = run(cfg)
    except ValueError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - report the cause in one line, keep the traceback above it
        if (cause := environment_error(e)) is not None:
            # The machine's complaint (run.root a file or read-only, an unreachable object store):
            # the user's to fix, like bad input, so one line and exit 2, as data_prep does.
            print(f"error: {cause}", file=sys.stderr)
            return 2
        log.exception("training failed")
        print(f"error: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    name = cfg.mlflow.registered_model
    print(
        f"done: step {result.step}, test bits/dim {result.test_bits_per_dim:.4f}, "
        f"{result.images_per_s:.1f} images/s, MLflow run {result.mlflow_run_id}"
    )
    if result.model_version:
        print(
            f"registered {name} v{result.model_version}; load it with "
            f"pipeline.registry.load_flow_model('models:/{name}@{cfg.mlflow.newest_alias}', "
            f"tracking_uri='{cfg.mlflow.tracking_uri}')"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
