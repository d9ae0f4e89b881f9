"""FlowConfig validation and the strict dict loader."""

from __future__ import annotations

import pytest

from flows import FlowConfig, dataclass_from_dict, dataclass_to_dict


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
    with pytest.raises(ValueError, match="unknown config field model.num_stepz"):
        dataclass_from_dict(FlowConfig, {"num_stepz": 4}, path="model")
    with pytest.raises(ValueError, match="unknown config field model.split.stratgy"):
        dataclass_from_dict(FlowConfig, {"split": {"stratgy": "eiw"}}, path="model")


def test_wrong_types_are_named() -> None:
    with pytest.raises(ValueError, match="model.num_steps: expected an integer"):
        dataclass_from_dict(FlowConfig, {"num_steps": "many"}, path="model")
    with pytest.raises(ValueError, match="model.image_shape: expected 3 items"):
        dataclass_from_dict(FlowConfig, {"image_shape": [3, 32]}, path="model")


def test_unknown_split_strategy_is_named() -> None:
    # SplitConfig validates its fields itself, so the bad value is caught while loading the config.
    with pytest.raises(ValueError, match="split: strategy: unknown 'magic'"):
        dataclass_from_dict(
            FlowConfig, {"split": {"strategy": "magic"}, "image_shape": [3, 8, 8], "num_levels": 2}
        )


def test_round_trip_through_dict() -> None:
    cfg = FlowConfig(image_shape=(1, 16, 16), num_levels=2, hidden_channels=32)
    assert dataclass_from_dict(FlowConfig, dataclass_to_dict(cfg)) == cfg
