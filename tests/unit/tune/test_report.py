"""Rows, ranking, the CSV table and the plots of a search; ASHA's rungs rebuilt from reported results."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.schedulers import TrialScheduler

from tune.asha import ResumableASHA
from tune.report import make_row, plot_learning_curves, plot_vs_depth, plot_vs_sigma, ranked, write_table
from tune.search import main

ROOT = Path(__file__).resolve().parents[3]
DEFAULTS = {
    "model.num_steps": 2,
    "model.num_levels": 2,
    "loss.sigma": 1e-3,
    "model.split.regularizer": "reference",
}
KEYS = ("loss.sigma", "model.num_steps", "model.num_levels", "model.split.regularizer")


def reports(*pairs: tuple[int, float]) -> list[dict]:
    return [{"step": s, "test_bits_per_dim": v, "mlflow_run_id": f"run{s}"} for s, v in pairs]


def row(trial_id: str, status: str, pairs, **config):
    return make_row(
        trial_id=trial_id,
        tune_status=status,
        results=reports(*pairs),
        config=config,
        defaults=DEFAULTS,
        keys=KEYS,
        metric="test_bits_per_dim",
        total_steps=16,
    )


def sample_rows() -> list:
    return [
        row("a", "TERMINATED", [(4, 7.9), (8, 7.5), (16, 7.2)], **{"loss.sigma": 1e-2}),
        row("b", "TERMINATED", [(4, 7.8), (8, 7.7)], **{"loss.sigma": 1e-4, "model.num_steps": 4}),
        row("c", "TERMINATED", [(4, 7.6), (8, 7.4), (16, 7.0)], **{"model.num_levels": 3}),
        row("d", "ERROR", [(4, 7.6)]),
        row("e", "RUNNING", []),
    ]


def test_rows_say_how_each_trial_ended_and_take_unsearched_values_from_the_base():
    a, b, c, d, e = sample_rows()
    assert (a.status, b.status, c.status, d.status, e.status) == (
        "completed",
        "stopped_early",
        "completed",
        "error",
        "unfinished",
    )
    assert (b.step, b.test_bits_per_dim, b.best_test_bits_per_dim) == (8, 7.7, 7.7)
    assert a.best_test_bits_per_dim == 7.2 and a.mlflow_run_id == "run16"
    assert b.values == {
        "loss.sigma": 1e-4,
        "model.num_steps": 4,
        "model.num_levels": 2,
        "model.split.regularizer": "reference",
    }
    assert math.isnan(e.test_bits_per_dim) and e.step == 0
    assert [r.trial_id for r in ranked(sample_rows())] == ["c", "a"]  # completed only, best first
    assert [r.trial_id for r in ranked(sample_rows(), mode="max")] == ["a", "c"]


def test_table_and_plots_are_written(tmp_path):
    rows = sample_rows()
    table = write_table(rows, tmp_path / "trials.csv")
    with open(table, newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["trial_id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert records[1]["status"] == "stopped_early" and records[1]["model.num_steps"] == "4"
    paths = [
        plot_vs_sigma(rows, tmp_path / "s.png"),
        plot_vs_depth(rows, tmp_path / "d.png"),
        plot_learning_curves({"c (7.000)": [(4, 7.6), (8, 7.4), (16, 7.0)]}, tmp_path / "c.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000


def fake_trial(trial_id: str, directory: Path | None):
    """What ResumableASHA reads from a Tune trial: its id and where its result.json is."""
    storage = SimpleNamespace(
        trial_dir_name=directory.name if directory else None,
        trial_fs_path=str(directory) if directory else None,
        storage_filesystem=pyarrow.fs.LocalFileSystem(),
    )
    return SimpleNamespace(trial_id=trial_id, storage=storage)


def new_asha() -> ResumableASHA:
    asha = ResumableASHA(
        time_attr="step", grace_period=8, max_t=12, reduction_factor=2, stop_last_trials=False
    )
    asha.set_search_properties("test_bits_per_dim", "min")
    return asha


def test_resumed_asha_compares_new_trials_with_the_rungs_of_restored_ones(tmp_path):
    done = tmp_path / "trial_id=a"
    done.mkdir()
    lines = [json.dumps({"step": s, "test_bits_per_dim": v}) for s, v in ((4, 7.7), (8, 7.4), (16, 7.2))]
    (done / "result.json").write_text("\n".join(lines) + '\n{"step": 20, "test_bits')  # cut short

    restored = new_asha()
    restored.on_trial_add(None, fake_trial("a", done))
    restored.on_trial_add(None, fake_trial("b", None))  # a new trial: no directory yet, nothing to replay
    worse = {"step": 8, "test_bits_per_dim": 7.6}
    assert restored.on_trial_result(None, fake_trial("b", None), worse) == TrialScheduler.STOP

    empty = new_asha()  # what plain ASHA does after Tuner.restore: nothing to compare with
    empty.on_trial_add(None, fake_trial("b", None))
    assert empty.on_trial_result(None, fake_trial("b", None), worse) == TrialScheduler.CONTINUE


def test_cli_checks_a_search_file_and_names_a_bad_field(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["--config", "configs/tune/sample.yaml", "--check"]) == 0
    out = capsys.readouterr().out
    assert "loss.sigma: loguniform[0.0001, 1.0]" in out and "8 trials (optuna)" in out
    assert (
        main(
            [
                "--config",
                "configs/tune/sample.yaml",
                "--check",
                "space.loss.sigma={loguniform: [0, 1]}",
            ]
        )
        == 2
    )
    assert "space.loss.sigma: loguniform needs two positive bounds" in capsys.readouterr().err
