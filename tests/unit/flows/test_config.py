"""FlowConfig validation, and flows' dataclasses loaded through the pipeline's pydantic loader."""

from __future__ import annotations

import dataclasses

import pytest

from flows import FlowConfig, SplitConfig
from flows.strategies import STRATEGY_CONFIGS, StrategyConfig
from pipeline.config import TrainConfig, flow_config_from_dict, load_config
from pipeline.config_loading import validate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_shape=(3, 12, 12), num_levels=3), "divisible by 2\\*\\*num_levels = 8"),
        (dict(n_bits=0), "n_bits"),
        (dict(n_bits=9), "n_bits"),
        (dict(num_levels=0), "num_levels"),
        (dict(coupling="spline"), "coupling"),
        (dict(split_prior="laplace"), "split_prior"),
    ],
)
def test_bad_config_values_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FlowConfig(**kwargs)


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match=r"model\.num_stepz: unknown field \(known: image_shape, "):
        load_config(None, ["model.num_stepz=4"])
    with pytest.raises(ValueError, match=r"model\.split\.stratgy: unknown field \(known: strategy, "):
        load_config(None, ["model.split.stratgy=eiw"])


def test_wrong_types_are_named() -> None:
    with pytest.raises(ValueError, match=r"model\.num_steps: input should be a valid integer.*'many'"):
        load_config(None, ["model.num_steps=many"])
    with pytest.raises(ValueError, match=r"model\.image_shape\[2\]: required"):
        load_config(None, ["model.image_shape=[3, 32]"])
    with pytest.raises(ValueError, match=r"model\.learn_top_prior: input should be a valid boolean"):
        load_config(None, ["model.learn_top_prior=maybe"])


def test_post_init_errors_name_the_dotted_field() -> None:
    # SplitConfig and FlowConfig check their own fields; the loader reports them under their path.
    with pytest.raises(ValueError, match=r"model\.split\.strategy: unknown 'magic'"):
        load_config(None, ["model.split.strategy=magic", "model.image_shape=[3, 8, 8]", "model.num_levels=2"])
    with pytest.raises(ValueError, match=r"model\.split\.warmup_steps: must be >= 1"):
        load_config(None, ["model.split.strategy=lcma", "model.split.lcma_warmup_steps=0"])
    with pytest.raises(ValueError, match=r"model\.split\.se_reduction: must be >= 1"):
        load_config(None, ["model.split.se_reduction=0"])
    with pytest.raises(ValueError, match=r"model\.n_bits: must be in 1\.\.8"):
        load_config(None, ["model.n_bits=9"])


def test_every_split_field_is_configurable() -> None:
    """Fields flows adds to a strategy's config are loaded (and checked) without any pipeline change."""
    for strategy, cls in STRATEGY_CONFIGS.items():
        defaults = cls(strategy=strategy)
        for field in dataclasses.fields(cls):
            value = getattr(defaults, field.name)
            cfg = load_config(None, {"model.split.strategy": strategy, f"model.split.{field.name}": value})
            assert type(cfg.model.split) is cls and getattr(cfg.model.split, field.name) == value


def test_round_trip_through_dict() -> None:
    cfg = load_config(
        None, ["model.image_shape=[1, 16, 16]", "model.num_levels=2", "model.hidden_channels=32"]
    )
    assert isinstance(cfg.model, FlowConfig) and isinstance(cfg.model.split, StrategyConfig)
    assert validate(TrainConfig, cfg.model_dump(mode="json")).model == cfg.model


def test_flow_config_from_a_plain_dict() -> None:
    cfg = FlowConfig(image_shape=(1, 16, 16), num_levels=2, split=SplitConfig(strategy="lcma"))
    assert flow_config_from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"flow_config\.json: model\.split\.ema_momentum: must be a finite"):
        flow_config_from_dict(
            {"split": {"strategy": "eiw", "ema_momentum": float("nan")}}, source="flow_config.json"
        )
    # A model logged before sigma became loss.sigma: split.sigma is a training setting, dropped here.
    assert (
        flow_config_from_dict(dataclasses.asdict(cfg) | {"split": {"strategy": "lcma", "sigma": 0.1}}) == cfg
    )
    with pytest.raises(ValueError, match=r"model\.hidden: unknown field"):
        flow_config_from_dict({"hidden": 3})
