"""The ablation's statistics: paired differences, t-intervals, per-run CSV rows and their merge."""

from __future__ import annotations

import math

import pytest

from pipeline.ablation_report import RunRow, append_run, markdown_table, read_runs, summarize, t_interval


def test_t_interval_matches_the_textbook_value() -> None:
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0])
    # sd = 1.2910, sem = 0.6455, t(0.975, 3) = 3.1824
    assert mean == 2.5 and half == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert math.isnan(t_interval([1.0])[1])


def rows(variant: str, values: list[float], **diagnostics: float) -> list[RunRow]:
    return [RunRow(variant=variant, seed=s, test_bits_per_dim=v, diagnostics=dict(diagnostics))
            for s, v in enumerate(values)]  # fmt: skip


def test_summary_pairs_by_seed_and_averages_diagnostics() -> None:
    data = rows("static", [4.0, 5.0, 6.0]) + rows("eiw", [4.1, 5.2, 6.3], **{"split0/churn": 0.5,
                                                                           "split1/churn": 0.1})  # fmt: skip
    summary = {r["variant"]: r for r in summarize(data)}
    eiw = summary["eiw"]
    assert eiw["diff_vs_reference"] == pytest.approx(0.2)  # paired: the seed spread (1.0) cancels
    assert eiw["diff_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert eiw["std"] == pytest.approx(1.1, rel=1e-6)
    assert eiw["churn"] == pytest.approx(0.3)
    assert math.isnan(summary["static"]["diff_vs_reference"]) and math.isnan(summary["static"]["churn"])
    table = markdown_table(summarize(data))
    assert "+0.2000 ± 0.2484" in table and "| static | 3 | 5.0000 |" in table
    against_eiw = {r["variant"]: r for r in summarize(data, reference_variant="eiw")}
    assert against_eiw["static"]["diff_vs_reference"] == pytest.approx(-0.2)
    assert "vs eiw (paired" in markdown_table(list(against_eiw.values()))


def test_per_run_csv_round_trip_and_merge(tmp_path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    append_run(a, RunRow(variant="static", seed=0, test_bits_per_dim=4.25, diagnostics={}))
    append_run(a, RunRow(variant="eiw", seed=0, test_bits_per_dim=4.5, diagnostics={"split0/churn": 0.25}))
    append_run(a, RunRow(variant="eiw", seed=0, test_bits_per_dim=4.4, diagnostics={"split0/churn": 0.5}))
    append_run(b, RunRow(variant="static", seed=1, test_bits_per_dim=4.0, diagnostics={}))
    merged = {(r.variant, r.seed): r for r in read_runs([a, b])}
    assert set(merged) == {("static", 0), ("eiw", 0), ("static", 1)}, "a rerun replaces its row"
    assert merged[("eiw", 0)].test_bits_per_dim == 4.4
    assert merged[("eiw", 0)].diagnostics == {"split0/churn": 0.5}
    assert merged[("static", 0)].diagnostics == {}
    (tmp_path / "bad.csv").write_text("variant,seed,test_bits_per_dim\nstatic,zero,4\n")
    with pytest.raises(ValueError, match="bad.csv: line 2"):
        read_runs([tmp_path / "bad.csv"])
    with pytest.raises(ValueError, match="missing.csv"):
        read_runs([tmp_path / "missing.csv"])


def test_table_shows_each_split_and_the_csv_keeps_the_run_length(tmp_path) -> None:
    data = rows("static", [4.0, 5.0]) + rows("eiw", [4.1, 5.2], **{"split0/kept_changes": 3.0,
                                                                   "split1/kept_changes": 40.0})  # fmt: skip
    summary = {r["variant"]: r for r in summarize(data)}
    assert summary["eiw"]["kept_changes_per_split"] == [3.0, 40.0]
    assert summary["eiw"]["kept_changes"] == pytest.approx(21.5)
    assert "| 3.0 / 40.0 |" in markdown_table(list(summary.values())), "a split's churn is not averaged away"
    path = tmp_path / "runs.csv"
    append_run(path, RunRow(variant="static", seed=0, test_bits_per_dim=4.0, steps=1000))
    append_run(path, RunRow(variant="eiw", seed=0, test_bits_per_dim=4.1))
    by_variant = {r.variant: r for r in read_runs([path])}
    assert by_variant["static"].steps == 1000 and by_variant["eiw"].steps is None


def test_runs_of_different_lengths_are_not_paired(tmp_path) -> None:
    short = [RunRow(variant="static", seed=s, test_bits_per_dim=4.0, steps=1000) for s in range(2)]
    long = [RunRow(variant="eiw", seed=s, test_bits_per_dim=3.9, steps=4000) for s in range(2)]
    with pytest.raises(ValueError, match="1000 steps: e.g. static seed 0, 4000 steps: e.g. eiw seed 0"):
        summarize(short + long)
    legacy = [RunRow(variant="eiw", seed=s, test_bits_per_dim=3.9) for s in range(2)]  # files without steps
    assert len(summarize(short + legacy)) == 2


def test_the_picture_draws_every_paired_variant(tmp_path) -> None:
    from pipeline.ablation_plot import plot_paired_differences

    data = rows("static", [4.0, 5.0, 6.0]) + rows("eiw", [4.1, 5.2, 6.3]) + rows("lcma", [3.9, 5.0, 5.9])
    path = plot_paired_differences(summarize(data), tmp_path / "cmp.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_paired_differences(summarize(rows("static", [4.0])), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists(), "nothing paired: no empty picture"
