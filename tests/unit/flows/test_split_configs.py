"""One config class per split strategy (issue 22): the discriminated union in the pipeline, the old
flat keys mapped, a knob of another strategy refused by name, and models unchanged bit for bit."""

from __future__ import annotations

import pytest
import torch

from flows import FlowConfig, build_flow, initialize_actnorm
from flows.strategies import EIWConfig, LCMAConfig, StaticConfig, legacy_split_keys
from pipeline.config import flow_config_from_dict, load_config

# The old flat SplitConfig's every field at its defaults (what a dump of it held), per strategy.
OLD_FLAT_DEFAULTS = dict(
    sigma=1e-3, regularizer="reference", generator="count", generator_hidden=None, se_reduction=16,
    se_activation="softmax", se_input="permuted", se_detach=False, se_bias=False, freeze_after_steps=None,
    stabilizer="none", ema_momentum=0.99, hysteresis_margin=1.0, lcma_warmup_steps=100,
    lcma_factor_out="low", lcma_momentum=0.99,
)  # fmt: skip
OLD_AND_NEW = {
    "static": ({"strategy": "static"}, StaticConfig()),
    "static_swapped": ({"strategy": "static_swapped"}, StaticConfig(strategy="static_swapped")),
    "eiw": (
        {"strategy": "eiw", "se_reduction": 2, "generator_hidden": 3, "stabilizer": "hysteresis"},
        EIWConfig(se_reduction=2, generator_hidden=3, stabilizer="hysteresis"),
    ),
    "lcma": (
        {"strategy": "lcma", "lcma_warmup_steps": 2, "lcma_factor_out": "high", "lcma_momentum": 0.9},
        LCMAConfig(warmup_steps=2, factor_out="high", momentum=0.9),
    ),
}
SHAPE = dict(image_shape=(3, 8, 8), num_levels=2, num_steps=2, hidden_channels=8, init_seed=7)


@pytest.mark.parametrize("strategy", sorted(OLD_AND_NEW))
def test_old_flat_keys_build_the_same_model_as_the_new_config(strategy: str) -> None:
    """Paired seeds depend on it: same state_dict keys and values, same float64 bits/dim."""
    old, new = OLD_AND_NEW[strategy]
    old_dump = {**OLD_FLAT_DEFAULTS, **old}  # a flow_config.json written before per-strategy configs
    from_old = flow_config_from_dict({**{k: v for k, v in SHAPE.items()}, "split": old_dump})
    assert from_old.split == new
    models = [build_flow(cfg).double() for cfg in (from_old, FlowConfig(**SHAPE, split=new))]
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    states = [m.state_dict() for m in models]
    assert list(states[0]) == list(states[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    for model in models:
        torch.manual_seed(3)  # initialize_actnorm dequantizes with the global RNG
        initialize_actnorm(model, x)
    bpd = [m.bits_per_dim(x, generator=torch.Generator().manual_seed(1)) for m in models]
    assert torch.equal(bpd[0], bpd[1])


def test_yaml_keys_pick_the_strategy_class_and_map_old_names() -> None:
    cfg = load_config(None, ["model.split.strategy=lcma", "model.split.lcma_warmup_steps=7"])
    assert cfg.model.split == LCMAConfig(warmup_steps=7)
    assert type(load_config(None).model.split) is EIWConfig  # the pipeline's default strategy
    with pytest.raises(ValueError, match="lcma_warmup_steps: the old name of warmup_steps"):
        legacy_split_keys({"strategy": "lcma", "lcma_warmup_steps": 3, "warmup_steps": 3})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.split.strategy=eiw", "model.split.lcma_warmup_steps=5"], "model.split.lcma_warmup_steps"),
        (["model.split.strategy=lcma", "model.split.se_reduction=4"], "model.split.se_reduction"),
        (["model.split.strategy=static", "model.split.target=entropy"], "model.split.target"),
        (["model.split.strategy=lcma", "model.split.no_such_knob=1"], "model.split.no_such_knob"),
    ],
)
def test_a_knob_of_another_strategy_is_an_error_naming_it(overrides: list[str], key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}: "):
        load_config(None, overrides)
