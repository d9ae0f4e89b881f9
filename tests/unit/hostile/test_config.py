"""Hostile inputs, class 6 (issue 21): values that would silently change the model are refused.

YAML 1.1 reads yes/no/on/off as booleans, and pydantic's lax mode turns True into 1 and "4" into 4:
`model.n_bits: yes` used to train a 1-bit model. Every numeric field of every config must refuse
booleans and strings, with the dotted key named.
"""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.config_loading import revise


def test_yaml_yes_for_n_bits_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_bits: yes\n")
    with pytest.raises(ValueError, match=r"c\.yaml: model\.n_bits: .*boolean"):
        load_config(str(path), [])


@pytest.mark.parametrize(
    "key",
    ["model.n_bits", "model.num_steps", "model.split.freeze_after_steps", "optim.lr", "optim.warmup_steps",
     "data.batch_size", "run.epochs", "run.seed", "mlflow.log_checkpoint_max_mb", "ray.num_workers",
     "ray.cpus_per_worker"],
)  # fmt: skip
@pytest.mark.parametrize("value", ["true", "on", "'4'", "'1'"])
def test_no_bool_or_string_for_any_number(key, value):
    with pytest.raises(ValueError, match=rf"{key.replace('.', r'[.]')}: input should be a valid"):
        load_config(None, [f"{key}={value}"])


def test_typed_revisions_are_strict_too():
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match=r"run\.epochs"):
        revise(cfg, {"run.epochs": True})
    assert revise(cfg, {"run.epochs": 3}).run.epochs == 3


def test_tune_search_numbers_are_strict(tmp_path):
    from tune.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text("search:\n  num_samples: yes\n")
    with pytest.raises(ValueError, match=r"search\.num_samples: input should be a valid integer"):
        load_spec(str(path))
