"""The data_prep CLI: subcommands come from the source table; every failure is one `error:` line, exit 2."""

from __future__ import annotations

import argparse

import pytest

from data_prep import cli
from data_prep.cli import main
from data_prep.sources import MODULES, Source, source_table

OWN_OPTIONS = {
    "imagenet": ["--resolution"],
    "lsun": ["--categories", "--resolution", "--protocol"],
    "cifar10": [],
    "folder": ["--crop-box", "--size", "--test-fraction"],
    "sample": ["--resolution", "--n-train", "--n-test"],
}


def test_every_source_in_the_table_is_a_subcommand_with_its_own_help(capsys):
    table = source_table()
    assert list(table) == list(MODULES) == list(OWN_OPTIONS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    overview = capsys.readouterr().out
    for name, source in table.items():
        assert source.help in overview
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in ["--output", "--splits", "--shard-size", "--overwrite", *OWN_OPTIONS[name]]:
            assert option in text, (name, option)
        assert ("--input INPUT" in text) == source.needs_input
    sample = cli.build_parser().parse_args(["sample", "--output", "o"])
    assert sample.shard_size == table["sample"].shard_size == 1000
    assert cli.build_parser().parse_args(["cifar10", "--input", "i", "--output", "o"]).shard_size == 10_000


def test_the_cli_dispatches_through_the_table(monkeypatch, tmp_path):
    """A source added to the table alone (no CLI edit) gets a subcommand, its options and its builder."""
    seen: list[argparse.Namespace] = []

    def build(args):
        seen.append(args)
        raise ValueError(f"fake source saw --colour {args.colour}")

    fake = Source(
        name="fake",
        help="a source that exists only in this test",
        description="nothing to read",
        add_options=lambda p: p.add_argument("--colour", default="red"),
        build=build,
        needs_input=False,
        shard_size=7,
    )
    table = source_table()
    monkeypatch.setattr(cli, "source_table", lambda: {**table, "fake": fake})
    code = main(["fake", "--output", str(tmp_path / "o"), "--colour", "blue"])
    assert code == 2 and len(seen) == 1
    assert seen[0].colour == "blue" and seen[0].shard_size == 7 and seen[0].command == "fake"


def test_an_output_path_under_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    code = main(["sample", "--n-train", "20", "--n-test", "10", "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(tmp_path / "file") in err and "Not a directory" in err
