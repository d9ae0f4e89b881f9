"""Search files: what loads, what is refused (naming the field), and what Tune receives from them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from tune.search import concurrency, expected_trials, param_space, trial_capacity
from tune.spec import asha_bounds, load_spec, spec_from_dict
from tune.trial import trial_config

ROOT = Path(__file__).resolve().parents[3]
TUNE_CONFIGS = ROOT / "configs" / "tune"


def tiny_dict() -> dict:
    data = yaml.safe_load((TUNE_CONFIGS / "tiny.yaml").read_text())
    data["base_config"] = str(ROOT / "configs" / "tiny.yaml")
    return data


def with_changes(**sections) -> dict:
    data = tiny_dict()
    for section, value in sections.items():
        data[section] = value
    return data


def optuna_space(**dims) -> dict:
    data = tiny_dict()
    data["search"] = {"algorithm": "optuna", "num_samples": 5, "seed": 3}
    data["space"] = dims or {"loss.sigma": {"loguniform": [1e-4, 1e-1]}}
    return data


@pytest.mark.parametrize("name", ["tiny", "sample", "imagenet64"])
def test_shipped_search_files_load(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # base_config paths are relative to the repo root
    spec = load_spec(TUNE_CONFIGS / f"{name}.yaml")
    assert spec.run.name and spec.space
    keys = set(spec.space)
    sigma = spec.space["loss.sigma"]  # every search spans 1e-4..1, where the ablation saw effects
    assert (min(sigma.values), max(sigma.values)) == (1e-4, 1.0)
    assert sigma.kind == ("grid" if name == "tiny" else "loguniform")
    if name != "tiny":  # the real searches cover sigma, depth, lr and the regularizer form
        assert {"loss.sigma", "model.num_steps", "model.num_levels", "optim.lr"} <= keys
        assert "model.split.regularizer" in keys
        assert spec.search.algorithm == "optuna" and spec.scheduler.type == "asha"


def test_tiny_grid_and_asha_bounds():
    spec = spec_from_dict(tiny_dict())
    assert expected_trials(spec) == 4
    assert spec.base.run.epochs == 4 and spec.base.data.batches_per_epoch == 4
    grace, max_t = asha_bounds(spec.base, spec.scheduler)
    assert (grace, max_t) == (8, 12)  # the last report (step 16) is past every rung


def test_a_trial_is_the_base_config_plus_its_values():
    spec = spec_from_dict(tiny_dict())
    cfg = trial_config(spec.base, {"optim.lr": 3e-3, "loss.sigma": 0.1}, "abc_00001")
    assert (cfg.optim.lr, cfg.loss.sigma, cfg.run.name) == (3e-3, 0.1, "train-trial_id=abc_00001")
    assert cfg.run.epochs == spec.base.run.epochs == 4  # everything else is the base's
    assert spec.base.run.async_checkpoints and not cfg.run.async_checkpoints  # ASHA needs timely reports
    with pytest.raises(ValueError, match=r"loss\.sigma: must be a finite number"):
        trial_config(spec.base, {"loss.sigma": float("nan")}, "abc_00002")


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"loss.sigma": {"loguniform": [-1e-4, 1e-1]}},
            "space.loss.sigma: loguniform needs two positive",
        ),
        (
            {"loss.sigma": {"loguniform": [1e-1, 1e-4]}},
            "space.loss.sigma: loguniform needs low < high",
        ),
        (
            {"loss.sigma": {"loguniform": [1e-4]}},
            "space.loss.sigma: loguniform needs two numeric",
        ),
        ({"loss.sigmaa": {"uniform": [0.0, 1.0]}}, "space.loss.sigmaa:"),
        ({"model.num_steps": {"choice": [2, 0]}}, "space.model.num_steps: 0 is not a valid model.num_steps"),
        (
            {"model.split.regularizer": {"choice": ["reference", "kl2"]}},
            "space.model.split.regularizer: 'kl2'",
        ),
        ({"model.num_steps": {"choice": [2, 2]}}, "space.model.num_steps: choice lists a value twice"),
        ({"model.num_steps": {"between": [2, 4]}}, "space.model.num_steps: unknown domain 'between'"),
        ({"model.num_steps": [2, 4]}, "space.model.num_steps: expected one domain"),
        ({"run.epochs": {"choice": [2, 4]}}, "space.run.epochs: run.*, mlflow.*, ray.*"),
        ({"model.num_steps": {"grid": [2, 4]}}, "space.model.num_steps: grid needs search.algorithm: grid"),
        ({}, "space: needs at least one dimension"),
        (
            {"loss.sigma": {"uniform": [0.0, float("inf")]}},
            "space.loss.sigma: uniform needs two numeric bounds",
        ),
        (
            {"loss.sigma": {"choice": [0.1, float("nan")]}},
            "space.loss.sigma: nan is not a valid",
        ),
    ],
)
def test_bad_space_names_the_field(space, message):
    with pytest.raises(ValueError) as info:
        spec_from_dict(optuna_space(**space) if space else with_changes(space={}))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"search": {"algorithm": "grid"}, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}},
            "space.optim.lr: ",
        ),
        ({"search": {"algorithm": "random"}}, "search.algorithm: unknown 'random'"),
        ({"search": {"algorithm": "grid", "max_concurrent_trials": 0}}, "search.max_concurrent_trials"),
        ({"search": {"algorithm": "grid", "metric": "loss"}}, "search.metric: unknown 'loss'"),
        ({"search": {"algorithm": "grid", "samples": 3}}, "search.samples: unknown field"),
        ({"search": {"algorithm": "grid", "num_samples": 0}}, "search.num_samples: input should be greater"),
        ({"scheduler": {"type": "pbt"}}, "scheduler.type: unknown 'pbt'"),
        ({"scheduler": {"type": "asha", "max_t": 16}}, "scheduler.max_t: rungs must end before"),
        ({"scheduler": {"type": "asha", "grace_period": 13}}, "scheduler.grace_period: 13 steps is beyond"),
        (
            {"scheduler": {"type": "asha", "reduction_factor": 1}},
            "scheduler.reduction_factor: input should be greater than 1",
        ),
        (
            {"scheduler": {"type": "asha", "reduction_factor": float("inf")}},
            "scheduler.reduction_factor: must be a finite number",
        ),
        ({"run": {"storage_path": "x"}}, "run.name: required"),
        ({"run": {"name": "a/b"}}, "run.name: must be a plain directory name"),
        ({"run": {"name": "s", "storage_path": "s3://"}}, "run.storage_path: 's3://': name a bucket"),
        ({"mlflow": {"alias": "latest"}}, "mlflow.alias: 'latest'"),
        ({"mlflow": {"alias": "v3"}}, "mlflow.alias: 'v3'"),
        ({"overrides": {"run.name": "x"}}, "overrides.run.name: set by the search"),
        ({"overrides": {"optim.lrr": 1.0}}, "overrides.optim.lrr:"),
        ({"overrides": {"run.checkpoint_every": 6}}, "run.checkpoint_every: Tune sees test bits/dim only"),
        ({"overrides": {"run.epochs": 1}}, "scheduler.type: asha needs two or more reports"),
        ({"base_config": "configs/nope.yaml"}, "base_config: no such file"),
        ({"overrides": {"optim.lr": float("nan")}}, "overrides.optim.lr: must be a finite number"),
        (
            {"overrides": {"run.sample_temperatures": [float("inf")]}},
            "overrides.run.sample_temperatures[0]: must be a finite number",
        ),
        ({"searchh": {}}, "searchh: unknown field"),
    ],
)
def test_bad_search_file_names_the_field(changes, message):
    with pytest.raises(ValueError) as info:
        spec_from_dict(with_changes(**changes))
    assert message in str(info.value)


def test_cli_overrides_reach_sections_and_dotted_fields():
    spec = spec_from_dict(
        tiny_dict(),
        [
            "run.name=other",
            "search.num_samples=2",
            "overrides.run.epochs=6",
            "space.model.num_steps={grid: [1, 2]}",
        ],
    )
    assert spec.run.name == "other" and spec.search.num_samples == 2
    assert spec.overrides["run.epochs"] == 6
    assert expected_trials(spec) == 2 * 2 * 2 * 2


def test_param_space_domains_and_seeded_optuna_suggestions():
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float

    data = optuna_space(
        **{
            "loss.sigma": {"loguniform": [1e-4, 1e-1]},
            "model.num_steps": {"choice": [1, 2]},
            "model.split.regularizer": {"choice": ["reference", "kl"]},
        }
    )
    spec = spec_from_dict(data)
    space = param_space(spec)
    assert isinstance(space["loss.sigma"], Float) and isinstance(space["model.num_steps"], Categorical)
    assert (space["loss.sigma"].lower, space["loss.sigma"].upper) == (1e-4, 1e-1)

    def suggestions(seed: int) -> list[dict]:
        searcher = OptunaSearch(sampler=TPESampler(seed=seed))
        assert searcher.set_search_properties("test_bits_per_dim", "min", copy.deepcopy(space))
        return [searcher.suggest(f"t{i}") for i in range(5)]

    first = suggestions(3)
    assert first == suggestions(3)  # reproducible from search.seed
    assert first != suggestions(4)
    for config in first:
        assert 1e-4 <= config["loss.sigma"] <= 1e-1
        assert config["model.num_steps"] in (1, 2) and config["model.split.regularizer"] in (
            "reference",
            "kl",
        )


def test_concurrency_is_bounded_by_gpus_or_cpus_per_trial():
    spec = spec_from_dict(tiny_dict())
    cfg = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=1", "ray.use_gpu=auto"])
    assert trial_capacity(cfg, {"CPU": 4}) == 1  # 2 workers + the trial's driver = 3 CPUs
    assert trial_capacity(cfg, {"CPU": 9}) == 3
    assert trial_capacity(cfg, {"CPU": 64, "GPU": 8}) == 4  # 8 GPUs / (2 workers x 1 GPU)
    cpu_only = load_config(None, ["ray.num_workers=2", "ray.use_gpu=false"])
    assert trial_capacity(cpu_only, {"CPU": 64, "GPU": 8}) == 21
    one = load_config(None, ["ray.num_workers=1", "ray.use_gpu=false"])
    assert concurrency(spec, one, {"CPU": 4}) == 2  # tiny asks for 2; the cluster holds 2
    auto = spec_from_dict(
        with_changes(search={"algorithm": "grid", "num_samples": 1, "max_concurrent_trials": "auto"})
    )
    assert concurrency(auto, one, {"CPU": 100}) == 4  # never more than the trials there are


SHUFFLE_FORM_KEYS = ("model.split.generator_input", "model.split.target", "model.split.stabilizer")


@pytest.mark.parametrize("name", ["sample", "imagenet64", "imagenet64_denseflow"])
def test_shipped_searches_search_the_shuffle_forms(name, monkeypatch):
    """A categorical over each knob of the opt-in forms (issue 24), the authors' value among them, and
    every value valid on the search's base; the DenseFlow search also has its depth dimension."""
    monkeypatch.chdir(ROOT)
    spec = load_spec(TUNE_CONFIGS / f"{name}.yaml")
    authors = {"model.split.generator_input": "count", "model.split.target": "attention"}
    for key in SHUFFLE_FORM_KEYS:
        assert spec.space[key].kind == "choice" and len(spec.space[key].values) >= 2
        assert authors.get(key, "none") in spec.space[key].values
    if name == "imagenet64_denseflow":
        depth = spec.space["model.denseflow.depth_multiplier"]
        assert depth.kind == "choice" and 1.0 in depth.values and len(depth.values) >= 3


def test_a_tiny_search_samples_denseflow_depth_and_the_shuffle_form():
    """Optuna (as the search runs it) samples the depth multiplier and the form; the trial configs
    build DenseFlow models of different depths and EIW splits of different forms."""
    from ray.tune.search.optuna import OptunaSearch

    from flows import build_flow
    from flows.denseflow.block import InvertibleDenseBlock

    data = optuna_space(
        **{
            "model.denseflow.depth_multiplier": {"choice": [1.0, 2.0, 3.0]},
            "model.split.generator_input": {"choice": ["count", "normalized"]},
            "model.split.target": {"choice": ["attention", "entropy"]},
        }
    )
    data["base_config"] = str(ROOT / "configs" / "tiny_denseflow.yaml")
    spec = spec_from_dict(data)
    space = OptunaSearch.convert_search_space(param_space(spec))
    searcher = OptunaSearch(space=space, metric="test_bits_per_dim", mode="min", seed=0)
    depths, forms = set(), set()
    for i in range(8):
        values = searcher.suggest(f"trial{i}")
        cfg = trial_config(spec.base, values, f"trial{i}").model
        model = build_flow(cfg)
        blocks = [m for m in model.levels.modules() if isinstance(m, InvertibleDenseBlock)]
        steps = sum(len(unit.layers) for block in blocks for unit in block.units)  # flow layers in all
        depths.add(steps)
        forms.add((cfg.split.generator_input, cfg.split.target))
        assert steps == sum(u * cfg.denseflow.level_layers(i) for i, u in enumerate(cfg.denseflow.units))
    assert len(depths) >= 2 and len(forms) >= 2
