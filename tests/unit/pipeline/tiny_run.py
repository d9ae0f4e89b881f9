"""The tiny recipe (configs/tiny.yaml) as a local run inside a test's own folder: no Ray, no progress
bar, one thread, MLflow in a sqlite file there, nothing registered or logged as an artifact. Shared
by the loop and resume tests (the ``workdir`` fixture is in this folder's conftest.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TrainConfig, load_config, resolve

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def local_overrides(workdir: Path, *more: str) -> list[str]:
    """Overrides that keep a run on this machine and inside ``workdir``; ``more`` come last (win)."""
    return [
        "ray.enabled=false",
        "run.progress_bar=off",
        "run.num_threads=1",
        "mlflow.register=false",
        "mlflow.log_model=false",
        "mlflow.log_checkpoint=false",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"data.root={workdir / 'data'}",
        f"run.root={workdir / 'runs'}",
        *more,
    ]


def tiny_config(workdir: Path, *more: str) -> TrainConfig:
    """configs/tiny.yaml with ``local_overrides``, resolved against ``workdir``."""
    return resolve(load_config(CONFIGS / "tiny.yaml", local_overrides(workdir, *more)), cwd=workdir)
