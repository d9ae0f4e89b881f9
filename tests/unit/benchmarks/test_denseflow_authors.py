"""benchmarks/flow_step.py --denseflow without the EIW authors' code: arguments and the skip message."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import denseflow_authors as dense  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dense.add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_default_to_the_tiny_configuration() -> None:
    args = parse(["--denseflow", "--units", "1", "1", "--layers", "1", "2", "--mid", "8", "8"])
    assert args.denseflow and not args.checkpoint
    assert args.units == [1, 1] and args.layers == [1, 2] and args.mid == [8, 8] and args.growth == 4


def test_missing_authors_code_skips_their_rows(tmp_path: Path, capsys) -> None:
    assert dense.locate_authors_code(str(tmp_path)) is None
    assert "skipping the authors' rows" in capsys.readouterr().err
    args = parse(["--checkpoint"])
    args.authors_code = None
    assert dense.names(args) == ["ours-denseflow", "ours-denseflow-ckpt"]
    args.authors_code = str(tmp_path)
    assert dense.names(args) == ["authors", "ours-denseflow", "authors-ckpt", "ours-denseflow-ckpt"]
