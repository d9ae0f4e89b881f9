"""Hostile inputs, class 4 (issue 21): a damaged checkpoint or a broken model never becomes the run's
state, a model version or an alias.

Real checkpoint files (write_checkpoint) and a real MLflow sqlite store, no mocks.
"""

from __future__ import annotations

import math
import zipfile

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline.checkpoint import (
    RESUME_KEYS,
    CorruptCheckpointError,
    read_checkpoint,
    read_newest_intact,
    write_checkpoint,
)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = {"w": torch.randn(256, 256, generator=g)}
    return {k: 0 for k in RESUME_KEYS} | {"step": seed, "model": weights, "test_bits_per_dim": 3.5}


def flip_tensor_bits(path) -> None:
    """Flip bytes in the middle of the weight tensor's data; the zip stays valid (torch checks no CRC)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 1000)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    for i in range(start, start + 64):
        raw[i] ^= 0xFF  # a float32 with every bit flipped: NaN-ish exponents in 64 weights
    path.write_bytes(bytes(raw))


def test_bit_flips_inside_tensor_data_are_a_corrupt_checkpoint(tmp_path):
    d = write_checkpoint(tmp_path / "checkpoint_000000010", state(10), "a: 1\n")
    flip_tensor_bits(d / "state.pt")
    with pytest.raises(CorruptCheckpointError, match="digest"):
        read_checkpoint(d)


def test_resume_falls_back_past_a_checkpoint_with_flipped_bits(tmp_path):
    old = write_checkpoint(tmp_path / "checkpoint_000000010", state(10), "a: 1\n")
    new = write_checkpoint(tmp_path / "checkpoint_000000020", state(20), "a: 1\n")
    flip_tensor_bits(new / "state.pt")
    found = read_newest_intact([new, old])
    assert found is not None and found.directory == old and found.state["step"] == 10
    assert len(found.unreadable) == 1 and "checkpoint_000000020" in found.unreadable[0]
    assert torch.isfinite(found.state["model"]["w"]).all()


def test_a_nan_test_score_never_registers_nor_moves_an_alias(tmp_path):
    from pipeline.config import MlflowConfig
    from pipeline.registry import register

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        mlflow.set_experiment("hostile")
        with mlflow.start_run() as run:
            model_dir = tmp_path / "model"
            model_dir.mkdir()
            (model_dir / "weights.txt").write_text("nan")
            mlflow.log_artifacts(str(model_dir), "model")
            uri = f"runs:/{run.info.run_id}/model"
            cfg = MlflowConfig(registered_model="hostile-model")
            with pytest.raises(ValueError, match="non-finite"):
                register(uri, cfg=cfg, test_bpd=math.nan, run_id=run.info.run_id)
        client = MlflowClient()
        assert client.search_model_versions("name='hostile-model'") == []
    finally:
        mlflow.set_tracking_uri(None)


def test_training_stops_with_a_clear_error_on_a_non_finite_score():
    from pipeline.loop import require_finite_score

    require_finite_score(3.2, 10)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite.*nothing was registered"):
            require_finite_score(bad, 10)
