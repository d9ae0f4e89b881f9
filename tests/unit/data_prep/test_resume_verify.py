"""Resumability, determinism, refusing mismatched output folders, and `verify` catching damage."""

from __future__ import annotations

import json

import pytest

from data_prep.cli import main
from data_prep.manifest import PROGRESS_NAME

ARGS = ["sample", "--n-train", "300", "--n-test", "40", "--shard-size", "64", "--no-progress"]


def build(out, *extra, workers=1):
    assert main([*ARGS, "--output", str(out), "--workers", str(workers), *extra]) == 0
    return out


def snapshot(split_dir):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(split_dir.glob("*.tar"))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ref") / "out")


def test_deterministic_across_runs_and_worker_counts(reference, tmp_path):
    other = build(tmp_path / "again", workers=2)
    for split in ("train", "test"):
        a, b = snapshot(reference / split), snapshot(other / split)
        assert a.keys() == b.keys() and len(a) == (5 if split == "train" else 1)
        assert all(a[n][2] == b[n][2] for n in a), "shards must be byte-identical"
        ma = json.loads((reference / split / "manifest.json").read_text())
        mb = json.loads((other / split / "manifest.json").read_text())
        assert ma["shards"] == mb["shards"]


def test_rerun_of_complete_output_touches_nothing(reference):
    before = snapshot(reference / "train")
    manifest = (reference / "train" / "manifest.json").read_bytes()
    build(reference)
    assert snapshot(reference / "train") == before
    assert (reference / "train" / "manifest.json").read_bytes() == manifest


def test_deleted_shard_is_the_only_one_rebuilt(reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = snapshot(out / "train")
    (out / "train" / "train-000002.tar").unlink()
    build(out)
    after = snapshot(out / "train")
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][2] == before[name][2]
        same_file = after[name][:2] == before[name][:2]
        assert same_file == (name != "train-000002.tar"), name


def test_interrupted_run_resumes_from_progress_record(reference, tmp_path):
    """Simulate a crash after two shards: progress.json lists them, no manifest, a stray temp file."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    split = out / "train"
    m = json.loads((split / "manifest.json").read_text())
    kept = m["shards"][:2]
    (split / "manifest.json").unlink()
    (split / PROGRESS_NAME).write_text(
        json.dumps(
            {
                "config": m["config"],
                "complete": False,
                "shards": [{"index": i, **s} for i, s in enumerate(kept)],
                "data_prep": {**m["data_prep"], "format": "eiw-data-prep/progress"},
            }
        )
    )
    for s in m["shards"][2:]:
        (split / s["name"]).unlink()
    (split / ".tmp-train-000002.tar.999").write_bytes(b"half a shard")
    # a listed shard whose bytes no longer match must be rebuilt too
    before = snapshot(split)
    build(out, "--splits", "train")
    after = snapshot(split)
    assert [after[s["name"]][2] for s in m["shards"]] == [
        p.read_bytes() for p in sorted((reference / "train").glob("*.tar"))
    ]
    assert after["train-000000.tar"][:2] == before["train-000000.tar"][:2]
    assert not (split / PROGRESS_NAME).exists() and not list(split.glob(".tmp-*"))
    assert json.loads((split / "manifest.json").read_text())["complete"] is True


def test_corrupted_listed_shard_is_rebuilt(reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    path = out / "train" / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    build(out)
    assert path.read_bytes() == (reference / "train" / "train-000001.tar").read_bytes()


def test_mismatched_output_folder_refused_unless_overwrite(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    code = main([*ARGS, "--output", str(out), "--seed", "1", "--workers", "1"])
    assert code == 2 and "another dataset/config" in capsys.readouterr().err
    assert main([*ARGS, "--output", str(out), "--seed", "1", "--workers", "1", "--overwrite"]) == 0
    assert json.loads((out / "train" / "manifest.json").read_text())["seed"] == 1
    # shards with no manifest at all are not silently mixed either
    stray = tmp_path / "stray" / "train"
    stray.mkdir(parents=True)
    (stray / "train-000000.tar").write_bytes(b"x")
    assert main([*ARGS, "--output", str(stray.parent), "--workers", "1"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_other_dataset_in_sibling_split_refused(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference / "test", out / "test")
    code = main(
        [
            "sample",
            "--resolution",
            "64",
            "--n-train",
            "20",
            "--splits",
            "train",
            "--output",
            str(out),
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert code == 2 and "another dataset" in capsys.readouterr().err


def test_verify_ok_and_catches_flipped_byte_and_truncation(reference, tmp_path, capsys):
    import shutil

    assert main(["verify", str(reference), "--workers", "1"]) == 0
    assert main(["verify", str(reference / "test"), "--workers", "1"]) == 0
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    capsys.readouterr()

    flipped = out / "train" / "train-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[3000] ^= 0x01  # inside a PNG payload
    flipped.write_bytes(bytes(data))
    truncated = out / "train" / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:20000])
    assert main(["verify", str(out), "--workers", "2"]) == 1
    report = capsys.readouterr().out
    lines = [ln for ln in report.splitlines() if "train-000001.tar" in ln]
    assert any("sha256" in ln for ln in lines)
    assert any("train-000003.tar" in ln and "sha256" in ln for ln in report.splitlines())
    assert any("train-000003.tar" in ln and "samples, manifest says 64" in ln for ln in report.splitlines())
    assert "train-000000.tar" not in report and "test-000000.tar" not in report


def test_verify_flags_undecodable_sample_by_key(reference, tmp_path, capsys):
    import shutil
    import tarfile

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    path = out / "test" / "test-000000.tar"
    with tarfile.open(path) as tar:
        first = tar.getmembers()[0]
        header = len(first.tobuf(format=tarfile.USTAR_FORMAT))
        key = first.name.split(".")[0]
    data = bytearray(path.read_bytes())
    data[header + 40 : header + 60] = b"\x00" * 20  # inside the first PNG's IHDR/IDAT
    path.write_bytes(bytes(data))
    assert main(["verify", str(out / "test")]) == 1
    report = capsys.readouterr().out
    assert f"test-000000.tar/{key}: png does not decode" in report


def test_png_level_changes_bytes_not_pixels(reference, tmp_path, capsys):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    out = build(tmp_path / "out", "--png-level", "6", "--splits", "test")
    a, b = reference / "test" / "test-000000.tar", out / "test" / "test-000000.tar"
    assert a.stat().st_size > 1.3 * b.stat().st_size  # level 0 (default) stores, level 6 deflates

    def pixels(path):
        ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None)
        return {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["png"]))) for s in ds}

    pa, pb = pixels(a), pixels(b)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert main(["verify", str(out)]) == 0
    assert json.loads((out / "test" / "manifest.json").read_text())["png_level"] == 6
    assert main([*ARGS, "--output", str(out), "--splits", "test", "--workers", "1"]) == 2
    assert "png_level" in capsys.readouterr().err


def test_overwrite_deletes_only_shards_a_record_names(reference, tmp_path, capsys):
    """`--overwrite` replaces our shards; an unrelated OUT/train/mine.tar is never deleted."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "train" / "mine.tar").write_bytes(b"a user's archive")
    before = snapshot(out / "train")
    code = main([*ARGS, "--output", str(out), "--seed", "1", "--workers", "1", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert str(out / "train") in err and "mine.tar" in err and "another --output" in err
    assert snapshot(out / "train") == before  # refused before anything was deleted
    # moved away, the overwrite goes ahead; a sibling split of another dataset loses only its shards
    (out / "train" / "mine.tar").rename(tmp_path / "mine.tar")
    (out / "test" / "mine.tar").write_bytes(b"another archive")
    code = main([*ARGS, "--output", str(out), "--resolution", "64", "--splits", "train", "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "test").iterdir()) == [".lock", "mine.tar"]
    assert (out / "test" / "mine.tar").read_bytes() == b"another archive"


def test_verify_names_a_manifest_key_of_the_wrong_type(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    path = out / "train" / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"][1]["count"] = str(m["shards"][1]["count"])
    path.write_text(json.dumps(m))
    assert main(["verify", str(out), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert f'{path}: shards[1].count must be a non-negative integer, got "64"' in report
    assert "Traceback" not in report


def test_interrupted_conversion_disk_full_then_verify_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """A real interruption: the disk fills up while the third shard is written (workers=1 runs inline)."""
    import errno

    from data_prep import writer

    real_write = writer._HashingFile.write
    shard_files = []

    def write_until_disk_full(self, data):
        if not getattr(self, "counted", False):
            self.counted = True
            shard_files.append(self)
        if len(shard_files) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name
        return real_write(self, data)

    monkeypatch.setattr(writer._HashingFile, "write", write_until_disk_full)
    out = tmp_path / "out"
    command = [*ARGS, "--output", str(out), "--workers", "1", "--splits", "train"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'train' / 'train-000002.tar'}: No space left on device\n"
    assert not list((out / "train").glob(".tmp-*")) and not (out / "train" / "manifest.json").exists()

    assert main(["verify", str(out / "train")]) == 1
    report = capsys.readouterr().out
    assert "unfinished conversion (progress.json records 2 of 5 shards done" in report
    assert f"re-run `python -m data_prep {' '.join(command)}` to resume it" in report
    assert main(["verify", str(out)]) == 1  # from the parent folder too
    assert "unfinished conversion" in capsys.readouterr().out

    monkeypatch.setattr(writer._HashingFile, "write", real_write)
    assert main(command) == 0
    assert main(["verify", str(out)]) == 0
