"""Training config: YAML + overrides, strict errors naming the key, shipped experiments, resolution."""

from __future__ import annotations

import re
import warnings

import pytest

from pipeline.config import TrainConfig, config_to_yaml, load_config, resolve
from pipeline.config_loading import flatten, parse_override, revise, validate, with_overrides
from tests.unit.pipeline.tiny_run import CONFIGS

SHIPPED = ("tiny", "sample", "imagenet64", "lsun_bedroom64")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiments_load_and_round_trip(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.run.name == name
    assert validate(TrainConfig, cfg.model_dump()) == cfg
    assert validate(TrainConfig, cfg.model_dump(mode="json")) == cfg  # lists back to tuples


def test_default_split_is_eiw():
    cfg = load_config(CONFIGS / "tiny.yaml")  # no model.split at all
    assert cfg.model.split.strategy == "eiw"
    assert TrainConfig().model.split.strategy == "eiw"
    # A split section that sets other fields keeps the pipeline's default strategy too.
    assert load_config(CONFIGS / "tiny.yaml", ["loss.sigma=0.1"]).model.split.strategy == "eiw"


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
        with_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])
    with pytest.raises(ValueError, match="optim.lr.x"):
        load_config(CONFIGS / "tiny.yaml", ["optim.lr.x=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=-.inf", "optim.weight_decay"),
        ("optim.betas=[0.9, .nan]", "optim.betas[1]"),
        ("optim.decay_per_epoch=.nan", "optim.decay_per_epoch"),
        ("optim.grad_clip_norm=.inf", "optim.grad_clip_norm"),
        ("run.sample_temperatures=[.nan]", "run.sample_temperatures[0]"),
        ("run.sample_temperatures=[0.5, .inf]", "run.sample_temperatures[1]"),
        ("ray.cpus_per_worker=.inf", "ray.cpus_per_worker"),
        ("ray.gpus_per_worker=.nan", "ray.gpus_per_worker"),
        ("loss.sigma=.nan", "loss.sigma"),
        ("loss.sigma=.inf", "loss.sigma"),
        ("model.split.ema_momentum=.nan", "model.split.ema_momentum"),
        ("model.split.hysteresis_margin=.inf", "model.split.hysteresis_margin"),
        ("model.split.target_temperature=.nan", "model.split.target_temperature"),
    ],
)
def test_nan_and_infinite_floats_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError) as info:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert f"{key}: must be a finite number" in str(info.value)
    assert "tiny.yaml" in str(info.value)


def test_every_float_field_refuses_nan_and_inf():
    """Walk every float of the config, including flows' dataclasses and fields added later."""
    flat = flatten(TrainConfig().model_dump())
    floats = [k for k, v in flat.items() if isinstance(v, float)]
    floats += [f"{k}[0]" for k, v in flat.items() if isinstance(v, tuple) and v and isinstance(v[0], float)]
    assert {"optim.lr", "loss.sigma", "run.sample_temperatures[0]"} <= set(floats)
    for key in floats:
        field, _, index = key.partition("[")
        for bad in (float("nan"), float("inf"), float("-inf")):
            value = bad
            if index:
                value = list(flat[field])
                value[int(index[:-1])] = bad
            with pytest.raises(ValueError, match=rf"{re.escape(key)}: must be a finite number"):
                load_config(None, {field: value})


def test_revise_validates_typed_values():
    cfg = load_config(CONFIGS / "tiny.yaml")
    changed = revise(cfg, {"optim.lr": 3e-4, "model.image_shape": (3, 64, 64)})
    assert changed.optim.lr == 3e-4 and changed.model.image_shape == (3, 64, 64)
    assert cfg.optim.lr == 1e-3  # the original is untouched (configs are immutable)
    with pytest.raises(ValueError, match=r"optim\.lr: must be a finite number"):
        revise(cfg, {"optim.lr": float("inf")})
    with pytest.raises(ValueError, match=r"model\.split\.strategy: unknown 'magic'"):
        revise(cfg, {"model.split.strategy": "magic"})


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("run:\n  sample_temperatures: [0.5, .nan]\nmodel:\n  split: {strategy: magic}\n")
    with pytest.raises(ValueError) as info:
        load_config(p)
    text = str(info.value)
    assert text.startswith(f"{p}: ")
    assert "run.sample_temperatures[1]: must be a finite number, got nan" in text
    assert "model.split.strategy: unknown 'magic'" in text


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
    flat = flatten(cfg.model_dump())
    assert flat["model.split.strategy"] == cfg.model.split.strategy
    assert flat["data.sample.num_train"] == 64


def test_lcma_whose_warm_up_outlasts_the_run_warns() -> None:
    with pytest.warns(UserWarning, match=r"warmup_steps \(1000\) is not below the run's 8 steps"):
        load_config(
            CONFIGS / "tiny.yaml", ["model.split.strategy=lcma", "model.split.warmup_steps=1000"]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(CONFIGS / "tiny.yaml", ["model.split.strategy=lcma", "model.split.lcma_warmup_steps=4"])


def test_the_old_model_split_sigma_key_maps_to_loss_sigma_with_a_warning():
    with pytest.warns(FutureWarning, match=r"model\.split\.sigma is deprecated: it is now loss\.sigma"):
        cfg = load_config(CONFIGS / "tiny.yaml", ["model.split.sigma=0.1"])
    assert cfg.loss.sigma == 0.1 and not hasattr(cfg.model.split, "sigma")
    with pytest.warns(FutureWarning):
        assert validate(TrainConfig, {"model": {"split": {"sigma": 0.2}}}).loss.sigma == 0.2
    with pytest.warns(FutureWarning):  # both given, the same value: fine
        assert (
            load_config(CONFIGS / "tiny.yaml", ["model.split.sigma=0.3", "loss.sigma=0.3"]).loss.sigma == 0.3
        )
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match=r"both given and differ; keep only loss\.sigma"),
    ):
        load_config(CONFIGS / "tiny.yaml", ["model.split.sigma=0.3", "loss.sigma=0.4"])
