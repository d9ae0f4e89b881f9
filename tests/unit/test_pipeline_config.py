"""Training config: YAML + overrides, strict errors naming the key, shipped experiments, resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.strategies import STRATEGIES
from pipeline.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    flatten,
    load_config,
    parse_override,
    resolve,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = ("tiny", "sample", "imagenet64", "lsun_bedroom64")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiments_load_and_round_trip(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.run.name == name
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_default_split_is_eiw_when_registered():
    cfg = load_config(CONFIGS / "tiny.yaml")
    expected = "eiw" if "eiw" in STRATEGIES else STRATEGIES[0]
    assert cfg.model.split.strategy == expected
    assert TrainConfig().model.split.strategy == expected


def test_paper_scale_configs_match_their_data():
    imagenet = load_config(CONFIGS / "imagenet64.yaml")
    lsun = load_config(CONFIGS / "lsun_bedroom64.yaml")
    assert imagenet.model.image_shape == (3, 64, 64) and lsun.model.image_shape == (3, 64, 64)
    assert imagenet.data.source == "shards" and lsun.data.source == "shards"
    assert imagenet.ray.num_workers >= 8 and imagenet.ray.use_gpu is True


def test_overrides_are_typed_yaml_values():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            "optim.lr=3e-4",
            "run.epochs=5",
            "model.image_shape=[3, 64, 64]",
            "model.split.strategy=static",
            "ray.enabled=false",
            "run.sample_temperatures=[0.5]",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.run.epochs == 5
    assert cfg.model.image_shape == (3, 64, 64)
    assert cfg.model.split.strategy == "static"
    assert cfg.ray.enabled is False
    assert cfg.run.sample_temperatures == (0.5,)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", r"optim\.lrr"),
        ("nosuch.key=1", r"nosuch"),
        ("model.split.sigmaa=1", r"model\.split\.sigmaa"),
    ],
)
def test_unknown_key_is_a_value_error_naming_it(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=abc", r"optim\.lr"),
        ("optim.lr=-1", r"lr"),
        ("optim.name=sgd", r"sgd"),
        ("run.epochs=0", r"epochs"),
        ("run.epochs=1.5", r"run\.epochs"),
        ("ray.use_gpu=maybe", r"use_gpu"),
        ("run.progress_bar=sometimes", r"progress_bar"),
        ("model.split.strategy=nope", r"model\.split\.strategy"),
        ("mlflow.newest_alias=latest", r"reserved"),
        ("data.source=ftp", r"source"),
        ("model.image_shape=[3, 30, 30]", r"divisible"),
    ],
)
def test_bad_value_is_a_value_error_naming_it(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=1", "optim.lr-x=1", "optim.lr=[1,"])
def test_bad_override_syntax(text):
    with pytest.raises(ValueError, match="bad override"):
        parse_override(text)


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_yaml_scientific_notation_reads_as_float(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(p).optim.lr == pytest.approx(3e-4)


def test_resolve_makes_paths_absolute_and_picks_a_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve(load_config(CONFIGS / "tiny.yaml"), cwd=tmp_path)
    assert cfg.run.root == str(tmp_path / "runs")
    assert cfg.data.root == str(tmp_path / "data" / "sample-32-tiny")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert (
        resolve(load_config(CONFIGS / "tiny.yaml"), cwd=tmp_path).mlflow.tracking_uri
        == "http://127.0.0.1:5999"
    )
    explicit = load_config(CONFIGS / "tiny.yaml", ["mlflow.tracking_uri=sqlite:///x/m.db"])
    assert resolve(explicit, cwd=tmp_path).mlflow.tracking_uri == f"sqlite:///{tmp_path / 'x' / 'm.db'}"


def test_yaml_dump_and_flat_params():
    cfg = load_config(CONFIGS / "tiny.yaml")
    text = config_to_yaml(cfg)
    assert "batches_per_epoch: 4" in text
    flat = flatten(config_to_dict(cfg))
    assert flat["model.split.strategy"] == cfg.model.split.strategy
    assert flat["data.sample.num_train"] == 64
