"""CIFAR-10 pickles and plain image folders -> shards, pixels and labels compared to the source."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.cli import main
from data_prep.sources.folder import hash_fraction


def read_split(split_dir):
    urls = sorted(str(p) for p in split_dir.glob("*.tar"))
    out = {}
    for s in wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    ):
        out[s["__key__"]] = (
            np.asarray(Image.open(io.BytesIO(s["png"]))),
            int(s["cls"]) if "cls" in s else None,
        )
    return out


def make_cifar(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"data": data,
                    b"labels": labels,
                    b"filenames": [b"x.png"] * n,
                },
                f,
            )
        for i in range(n):
            expected[f"{name}_{i:05d}"] = (data[i].reshape(3, 32, 32).transpose(1, 2, 0), labels[i])
    return folder, expected


def test_cifar10_exact(tmp_path):
    folder, expected = make_cifar(tmp_path / "in")
    out = tmp_path / "out"
    assert (
        main(
            [
                "cifar10",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--shard-size",
                "8",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    got = {**read_split(out / "train"), **read_split(out / "test")}
    assert got.keys() == expected.keys()
    for key, (pixels, label) in expected.items():
        np.testing.assert_array_equal(got[key][0], pixels)
        assert got[key][1] == label
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["total"] == 30 and [s["count"] for s in m["shards"]] == [8, 8, 8, 6] and m["label_offset"] == 0


@pytest.mark.parametrize("damage", ["truncate", "width"])
def test_cifar10_bad_batch_names_file(tmp_path, capsys, damage):
    folder, _ = make_cifar(tmp_path / "in", n=2)
    path = folder / "data_batch_4"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, f)
    code = main(["cifar10", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "data_batch_4" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("manifest.json"))


def smooth(rng, w, h, mode="RGB"):
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).convert(mode)


def make_folder(root, n=24, seed=0):
    """CelebA-like: 178x218 JPEGs (and a few PNGs, one grayscale) in one folder."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        ext = "png" if i % 5 == 0 else "jpg"
        smooth(rng, 178, 218, "L" if i == 3 else "RGB").save(root / f"{i:06d}.{ext}")
    (root / "list_attr.txt").write_text("not an image")
    return sorted(p.name for p in root.iterdir() if p.suffix != ".txt")


def expected_folder(path, box, size):
    img = Image.open(path).convert("RGB").crop(box)
    w, h = img.size
    nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def test_folder_crop_resize_and_hash_split(tmp_path):
    root = tmp_path / "img_align_celeba"
    names = make_folder(root)
    out = tmp_path / "out"
    box = (15, 40, 163, 188)
    assert (
        main(
            [
                "folder",
                "--input",
                str(root),
                "--output",
                str(out),
                "--crop-box",
                "15,40,163,188",
                "--size",
                "32",
                "--test-fraction",
                "0.3",
                "--shard-size",
                "7",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    train, test = read_split(out / "train"), read_split(out / "test")
    assert set(test) == {n.split(".")[0] for n in names if hash_fraction(n) < 0.3}
    assert set(train) | set(test) == {n.split(".")[0] for n in names} and not set(train) & set(test)
    assert 0 < len(test) < len(names)
    for name in names:
        key = name.split(".")[0]
        img, cls = (train | test)[key]
        assert cls is None and img.shape == (32, 32, 3)
        np.testing.assert_array_equal(img, expected_folder(root / name, box, 32))
    m = json.loads((out / "test" / "manifest.json").read_text())
    assert m["resolution"] == [32, 32] and m["crop_box"] == list(box) and "label_offset" not in m


def test_folder_without_size_keeps_pixels(tmp_path):
    root = tmp_path / "imgs"
    names = make_folder(root, n=6)
    out = tmp_path / "out"
    assert (
        main(
            [
                "folder",
                "--input",
                str(root),
                "--output",
                str(out),
                "--test-fraction",
                "0",
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    got = read_split(out / "train")
    for name in names:
        np.testing.assert_array_equal(
            got[name.split(".")[0]][0], np.asarray(Image.open(root / name).convert("RGB"))
        )
    assert not (out / "test").exists()


@pytest.mark.parametrize("bad", ["rgba", "size", "corrupt"])
def test_folder_bad_image_names_file(tmp_path, capsys, bad):
    root = tmp_path / "imgs"
    make_folder(root, n=4)
    rng = np.random.default_rng(1)
    if bad == "rgba":
        smooth(rng, 178, 218, "RGBA").save(root / "zz_bad.png")
    elif bad == "size":
        smooth(rng, 100, 100).save(root / "zz_bad.png")
    else:
        (root / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(
        [
            "folder",
            "--input",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--test-fraction",
            "0",
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "zz_bad" in err, err
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


class _Payload:
    """Unpickling this runs `exec(code)`: what a booby-trapped dataset file would carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("where", ["whole file", "inside the dict"])
def test_cifar10_pickle_payload_never_runs(tmp_path, capsys, where):
    folder, _ = make_cifar(tmp_path / "in", n=2)
    marker = tmp_path / "payload-ran"
    payload = _Payload(f"open({str(marker)!r}, 'w').write('ran')")
    obj = payload if where == "whole file" else {b"data": payload, b"labels": [0, 1]}
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    code = main(["cifar10", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle's payload ran"
    # protocol 2 names Python 2's module for builtins (__builtin__), as the official files would
    assert code == 2 and "data_batch_2" in err and "refusing to load __builtin__.exec" in err, err
    assert not list((tmp_path / "out").rglob("manifest.json"))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    """The restricted unpickler admits what numpy arrays need under every protocol (the official
    files are Python 2 pickles, protocol 2; re-exports may use any)."""
    from data_prep.sources.cifar10 import load_batch

    rng = np.random.default_rng(protocol)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": [7, 0, 9], b"filenames": [b"a.png"] * 3}, f, protocol=protocol)
    images, labels = load_batch(path)
    np.testing.assert_array_equal(images, data.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels.tolist() == [7, 0, 9]
    load_batch.cache_clear()


def test_cifar10_python2_module_names_load(tmp_path):
    """Files written by numpy 1 name numpy.core.multiarray (numpy 2 renamed it numpy._core)."""
    from data_prep.sources.cifar10 import load_batch

    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [1, 2]}, protocol=2)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in raw  # GLOBAL opcode: newline-terminated text
    path = tmp_path / "test_batch"
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    images, labels = load_batch(path)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [1, 2]
    load_batch.cache_clear()


@pytest.mark.parametrize(
    "labels, message", [([0, 10], "label 10 at row 1 is outside 0..9"), ([0, 1.5], "1.5")]
)
def test_cifar10_bad_labels_name_file_and_value(tmp_path, capsys, labels, message):
    folder, _ = make_cifar(tmp_path / "in", n=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f)
    code = main(["cifar10", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "test_batch" in err and message in err, err
