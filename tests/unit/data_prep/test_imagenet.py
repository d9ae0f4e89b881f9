"""ImageNet npz release -> shards, checked pixel for pixel against the planar source rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.cli import main

ROWS = 7  # per train batch; 10 batches -> 70 train images


def read_split(split_dir):
    """All samples of a split through plain webdataset: {key: (HWC uint8, cls or None)}."""
    urls = sorted(str(p) for p in split_dir.glob("*.tar"))
    out = {}
    for s in wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    ):
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        out[s["__key__"]] = (img, int(s["cls"]) if "cls" in s else None)
    return out


def make_release(root, r=64, rows=ROWS, val_rows=9, seed=0):
    """Files in exactly the official layout; returns {key: (planar row, 1-based label)}."""
    rng = np.random.default_rng(seed)
    expected = {}

    def write(path, n, compressed):
        data = rng.integers(0, 256, (n, 3 * r * r), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        (np.savez_compressed if compressed else np.savez)(path, data=data, labels=labels)
        for i in range(n):
            expected[f"{path.stem}_{i:07d}"] = (data[i], int(labels[i]))

    for k in range(1, 11):
        d = f"Imagenet{r}_train_part{1 if k <= 5 else 2}_npz" if r == 64 else f"Imagenet{r}_train_npz"
        write(root / d / f"train_data_batch_{k}.npz", rows, compressed=k % 2 == 0)
    write(root / f"Imagenet{r}_val_npz" / "val_data.npz", val_rows, compressed=True)
    return expected


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_release(root)


def test_imagenet64_pixels_labels_and_manifest(release, tmp_path):
    root, expected = release
    out = tmp_path / "out"
    assert (
        main(
            [
                "imagenet",
                "--input",
                str(root),
                "--output",
                str(out),
                "--shard-size",
                "16",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    got = {**read_split(out / "train"), **read_split(out / "test")}
    assert got.keys() == expected.keys()
    for key, (row, label) in expected.items():
        img, cls = got[key]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, row.reshape(3, 64, 64).transpose(1, 2, 0))
        assert cls == label - 1
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["source"] == "imagenet" and m["resolution"] == [64, 64] and m["channels"] == 3
    assert m["label_offset"] == -1 and m["n_bits"] == 8 and m["sample_format"] == "png" and m["complete"]
    assert [s["count"] for s in m["shards"]] == [16, 16, 16, 16, 6] and m["total"] == 70
    assert m["command"][:4] == ["python", "-m", "data_prep", "imagenet"]
    assert m["skipped"] == [] and m["skipped_count"] == 0
    t = json.loads((out / "test" / "manifest.json").read_text())
    assert t["source_split"] == "val" and t["total"] == 9


def test_imagenet32_width_inferred(tmp_path):
    root = tmp_path / "in"
    expected = make_release(root, r=32, rows=2, val_rows=3, seed=1)
    out = tmp_path / "out"
    assert (
        main(["imagenet", "--input", str(root), "--output", str(out), "--splits", "test", "--no-progress"])
        == 0
    )
    got = read_split(out / "test")
    assert len(got) == 3
    for key, (img, cls) in got.items():
        row, label = expected[key]
        np.testing.assert_array_equal(img, row.reshape(3, 32, 32).transpose(1, 2, 0))
        assert cls == label - 1


def _run_bad(root, out, capsys):
    code = main(["imagenet", "--input", str(root), "--output", str(out), "--workers", "1", "--no-progress"])
    return code, capsys.readouterr().err


def _copy_release(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_batch_is_an_error_naming_it(release, tmp_path, capsys):
    root = _copy_release(release[0], tmp_path / "in")
    (root / "Imagenet64_train_part2_npz" / "train_data_batch_7.npz").unlink()
    code, err = _run_bad(root, tmp_path / "out", capsys)
    assert code == 2 and "train_data_batch_7.npz" in err
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_truncated_npz_is_an_error_naming_it(release, tmp_path, capsys):
    root = _copy_release(release[0], tmp_path / "in")
    path = root / "Imagenet64_train_part1_npz" / "train_data_batch_3.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = _run_bad(root, tmp_path / "out", capsys)
    assert code == 2 and "train_data_batch_3.npz" in err
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_wrong_width_is_an_error_naming_the_file(release, tmp_path, capsys):
    root = _copy_release(release[0], tmp_path / "in")
    path = root / "Imagenet64_train_part2_npz" / "train_data_batch_9.npz"
    np.savez(path, data=np.zeros((4, 3 * 32 * 32), np.uint8), labels=np.ones(4, np.int64))
    code, err = _run_bad(root, tmp_path / "out", capsys)
    assert code == 2 and "train_data_batch_9.npz" in err and "3072" in err
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_zero_based_labels_rejected(tmp_path, capsys):
    root = tmp_path / "in"
    make_release(root, rows=2, val_rows=2)
    np.savez(
        root / "Imagenet64_val_npz" / "val_data.npz",
        data=np.zeros((2, 12288), np.uint8),
        labels=np.array([0, 5]),
    )
    code = main(
        [
            "imagenet",
            "--input",
            str(root),
            "--output",
            str(tmp_path / "o"),
            "--splits",
            "test",
            "--no-progress",
        ]
    )
    assert code == 2 and "1-based" in capsys.readouterr().err


def test_two_workers_write_the_same_bytes(release, tmp_path):
    root, _ = release
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        args = ["imagenet", "--input", str(root), "--output", str(out), "--splits", "train"]
        assert main([*args, "--shard-size", "16", "--workers", workers, "--no-progress"]) == 0
        outs.append({p.name: p.read_bytes() for p in (out / "train").glob("*.tar")})
    assert outs[0] == outs[1] and len(outs[0]) == 5


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([5, 5000]), "label 5000 at row 1 is outside 1..1000"),
        (np.array([1.7, 3.0]), "label 1.7 at row 0 is not a whole number"),
    ],
)
def test_labels_outside_the_release_are_refused(tmp_path, capsys, labels, message):
    """5000 used to be stored as 4999 next to `num_classes: 1000`, 1.7 as 0; verify said OK."""
    root = tmp_path / "in"
    make_release(root, rows=2, val_rows=2)
    np.savez(root / "Imagenet64_val_npz" / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=labels)
    out = tmp_path / "o"
    code = main(["imagenet", "--input", str(root), "--output", str(out), "--splits", "test", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "val_data.npz" in err and message in err, err
    assert err.count("\n") == 1 and not list(out.rglob("manifest.json"))


def test_verify_flags_labels_outside_num_classes(release, tmp_path, capsys):
    """Shards written with a label past the manifest's num_classes are a finding of verify."""
    import hashlib
    import tarfile

    root, _ = release
    out = tmp_path / "out"
    args = ["imagenet", "--input", str(root), "--output", str(out), "--splits", "test", "--no-progress"]
    assert main(args) == 0
    split = out / "test"
    manifest = json.loads((split / "manifest.json").read_text())
    shard = split / manifest["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".cls") and member.name.startswith("val_data_0000003"):
                data = b"4999"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (split / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(split)]) == 1
    report = capsys.readouterr().out
    assert "val_data_0000003: cls 4999 outside 0..999 (manifest num_classes 1000)" in report
