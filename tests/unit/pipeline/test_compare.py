"""pipeline.compare: the comparison file is validated up front and the table's statistics are right."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.ablation_report import RunRow, append_run
from pipeline.compare import config_for, load_comparison, main

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_comparison_builds_every_variant() -> None:
    comparison = load_comparison(ROOT / "configs" / "compare.yaml")
    assert "static" in comparison.variants
    strategies = {v.get("model.split.strategy") for v in comparison.variants.values()}
    assert strategies == {"static", "lcma", "eiw"}
    assert {v.get("model.split.factor_out") for v in comparison.variants.values()} >= {"low", "high"}
    assert {v.get("model.split.regularizer") for v in comparison.variants.values()} >= {"reference", "kl"}
    assert len(comparison.seeds) >= 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("variants: {}\n", "variants"),
        ("seeds: []\nvariants: {static: {}}\n", "seeds"),
        ("colour: red\nvariants: {static: {}}\n", "colour: unknown field"),
        ("seeds: [0, 1.5]\nvariants: {static: {}}\n", r"seeds\[1\]"),
        ("variants: {bad: {optim.lr: .nan}}\n", r"variants.bad: .*optim\.lr: must be a finite number"),
        ("variants: {bad: {model.split.strategy: magic}}\n", "variants.bad: .*strategy"),
        ("variants: {bad: {model.num_stepz: 2}}\n", "variants.bad: .*num_stepz"),
    ],
)
def test_bad_comparison_files_name_the_field(tmp_path: Path, text: str, match: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    path = tmp_path / "cmp.yaml"
    path.write_text("base: configs/tiny.yaml\n" + text)
    with pytest.raises(ValueError, match=match):
        load_comparison(path)


def test_variant_values_are_applied_as_typed_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    path = tmp_path / "cmp.yaml"
    path.write_text(
        "base: configs/tiny.yaml\noverrides: {run.sample_temperatures: [0.7]}\n"
        "variants: {small-lr: {optim.lr: 3e-4, loss.sigma: 1.0e-1}}\n"
    )
    comparison = load_comparison(path)
    assert comparison.name == "cmp"
    cfg = config_for(comparison, "small-lr", 3, ["run.epochs=1"])
    assert cfg.optim.lr == 3e-4 and cfg.loss.sigma == 0.1 and cfg.run.sample_temperatures == (0.7,)
    assert (cfg.run.name, cfg.run.seed, cfg.run.epochs, cfg.ray.enabled) == (
        "cmp-small-lr-seed3",
        3,
        1,
        False,
    )
    assert cfg.model.init_seed == 3, "a seed also draws the initial weights (shared by every variant)"


def test_report_mode_tabulates_finished_runs_from_several_files(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    halves = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for seed, (static, eiw) in enumerate([(5.0, 4.9), (6.0, 5.9), (7.0, 6.9)]):
        path = halves[seed % 2]
        append_run(path, RunRow(variant="static", seed=seed, test_bits_per_dim=static))
        append_run(
            path, RunRow(variant="eiw", seed=seed, test_bits_per_dim=eiw, diagnostics={"split0/churn": 0.5})
        )
    config = tmp_path / "cmp.yaml"
    config.write_text(
        "base: configs/tiny.yaml\nseeds: [0, 1, 2]\n"
        "variants: {static: {model.split.strategy: static}, eiw: {model.split.strategy: eiw}}\n"
    )
    code = main(["--config", str(config), f"run.root={tmp_path / 'runs'}", "--report", *map(str, halves)])
    assert code == 0
    out = capsys.readouterr().out
    # Seeds spread by 1.0 bit/dim, yet every paired difference is exactly -0.1 (interval 0).
    assert "| eiw | 3 | 5.9000 | 1.0000 | -0.1000 ± 0.0000 | 0.500 |" in out
    assert (tmp_path / "runs" / "compare" / "cmp.md").read_text() in out
    assert (tmp_path / "runs" / "compare" / "cmp.png").stat().st_size > 0, "and its picture"
    assert main(["--config", str(config), "--report", str(tmp_path / "none.csv")]) == 2
    longer = tmp_path / "longer.csv"  # a 4,000-step run must not be paired with 1,000-step ones
    append_run(halves[0], RunRow(variant="static", seed=0, test_bits_per_dim=5.0, steps=1000))
    append_run(longer, RunRow(variant="eiw", seed=0, test_bits_per_dim=4.0, steps=4000))
    code = main(["--config", str(config), "--report", str(halves[0]), str(longer)])
    assert code == 2 and "mix runs of different lengths" in capsys.readouterr().err
