"""Hostile inputs, class 1 (issue 21): data_prep deletes and overwrites only what it can prove it wrote.

Each test plants files a hostile or careless user could leave in or beside `--output` and checks
that `--overwrite` refuses them (exit 2, one `error:` line naming the path) and leaves them intact.
"""

from __future__ import annotations

import json

from data_prep.cli import main

OUTPUT_RECORD, SIGNATURE_KEY = ".data_prep.json", "data_prep"  # literals: the test must load on old code
ARGS = ["sample", "--n-train", "40", "--n-test", "20", "--shard-size", "32", "--no-progress"]
ARGS += ["--workers", "1"]


def convert(out, *extra):
    return main([*ARGS, "--output", str(out), *extra])


def foreign_split(folder, name="other"):
    """Another tool's WebDataset split: shards named like ours and a manifest listing them."""
    folder.mkdir(parents=True)
    shard = folder / f"{name}-000000.tar"
    shard.write_bytes(b"their data" * 100)
    manifest = {"config": {"dataset": {"source": "theirs"}}, "shards": [{"name": shard.name}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return shard


def test_foreign_manifest_beside_output_is_not_deleted(tmp_path, capsys):
    out = tmp_path / "out"
    shard = foreign_split(out / "other")
    assert convert(out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "other/manifest.json" in err and "signature" in err
    assert shard.exists() and (out / "other" / "manifest.json").exists()


def test_unrelated_manifest_in_split_is_not_deleted(tmp_path, capsys):
    split = tmp_path / "out" / "train"
    split.mkdir(parents=True)
    webapp = {"name": "my web app", "icons": [], "config": {"dataset": {"source": "webapp"}}}
    (split / "manifest.json").write_text(json.dumps(webapp))
    assert convert(tmp_path / "out", "--overwrite", "--splits", "train") == 2
    assert "train/manifest.json" in capsys.readouterr().err
    assert json.loads((split / "manifest.json").read_text()) == webapp


def test_symlinked_sibling_split_outside_output_is_not_deleted(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    assert convert(elsewhere, "--splits", "test") == 0  # a real data_prep dataset of its own output
    precious = sorted((elsewhere / "test").glob("*.tar"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "test").symlink_to(elsewhere / "test")
    assert convert(out, "--overwrite", "--splits", "train", "--resolution", "64") == 2
    assert "error: " in capsys.readouterr().err
    assert precious and all(p.exists() for p in precious)
    assert (elsewhere / "test" / "manifest.json").exists()


def test_split_copied_from_another_output_is_not_ours_to_delete(tmp_path, capsys):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    assert convert(a, "--splits", "test") == 0
    assert convert(b, "--splits", "train") == 0
    shutil.copytree(a / "test", b / "test")  # signed, but for output a
    assert convert(b, "--overwrite", "--splits", "train", "--resolution", "64") == 2
    assert "another data_prep output" in capsys.readouterr().err
    assert (b / "test" / "manifest.json").exists()


def test_every_record_carries_the_signature(tmp_path):
    out = tmp_path / "out"
    assert convert(out, "--splits", "train") == 0
    oid = json.loads((out / OUTPUT_RECORD).read_text())[SIGNATURE_KEY]["output_id"]
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest[SIGNATURE_KEY] == {"format": "eiw-data-prep/manifest", "version": 1, "output_id": oid}
    lock = json.loads((out / "train" / ".lock").read_text())
    assert lock[SIGNATURE_KEY]["format"] == "eiw-data-prep/lock" and lock[SIGNATURE_KEY]["output_id"] == oid
    # our own records are still ours: --overwrite with other settings replaces them
    assert convert(out, "--overwrite", "--splits", "train", "--n-train", "50") == 0
    assert json.loads((out / "train" / "manifest.json").read_text())["total"] == 50
