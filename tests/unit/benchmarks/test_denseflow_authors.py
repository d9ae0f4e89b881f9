"""benchmarks/flow_step.py --denseflow: its arguments, and where the EIW authors' code comes from
(``--authors-code``, else ``$EIW_AUTHORS_CODE``; neither is an ``error:`` line naming both, exit 2)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import denseflow_authors as dense


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dense.add_arguments(parser)
    return parser.parse_args(argv)


def authors_checkout(root: Path) -> Path:
    """A stand-in checkout of studying910/EIW-Flow: only the file that marks its DIW-Flow/ folder."""
    marker = root / "DIW-Flow" / dense.MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text("# stand-in\n")
    return root


def test_arguments_default_to_the_tiny_configuration() -> None:
    args = parse(["--denseflow", "--units", "1", "1", "--layers", "1", "2", "--mid", "8", "8"])
    assert args.denseflow and not args.checkpoint and args.authors_code is None
    assert args.units == [1, 1] and args.layers == [1, 2] and args.mid == [8, 8] and args.growth == 4
    args.checkpoint = True
    assert dense.names(args) == ["authors", "ours-denseflow", "authors-ckpt", "ours-denseflow-ckpt"]


def test_no_authors_code_is_an_error_naming_the_option_and_the_variable(monkeypatch, capsys) -> None:
    monkeypatch.delenv(dense.AUTHORS_CODE_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        dense.locate_authors_code(None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--authors-code" in err and "EIW_AUTHORS_CODE" in err


def test_a_folder_without_their_code_is_an_error_naming_it(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(dense.AUTHORS_CODE_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        dense.locate_authors_code(None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: EIW_AUTHORS_CODE {tmp_path}:") and dense.MARKER in err


def test_the_option_wins_over_the_variable_and_a_checkout_gives_its_diw_flow(tmp_path, monkeypatch) -> None:
    checkout = authors_checkout(tmp_path / "EIW-Flow")
    monkeypatch.setenv(dense.AUTHORS_CODE_ENV, str(tmp_path / "elsewhere"))
    assert dense.locate_authors_code(str(checkout)) == checkout / "DIW-Flow"
    assert dense.locate_authors_code(str(checkout / "DIW-Flow")) == checkout / "DIW-Flow"
    monkeypatch.setenv(dense.AUTHORS_CODE_ENV, str(checkout))
    assert dense.locate_authors_code(None) == checkout / "DIW-Flow"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_bare_clone_is_extracted(tmp_path) -> None:
    checkout = authors_checkout(tmp_path / "EIW-Flow")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(checkout)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(bare)], check=True)
    folder = dense.locate_authors_code(str(bare))
    assert folder.name == "DIW-Flow" and (folder / dense.MARKER).read_text() == "# stand-in\n"
