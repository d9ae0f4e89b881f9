"""LSUN lmdb (webp + jpeg values, one corrupt) -> shards, compared to the same PIL ops done here."""

from __future__ import annotations

import io
import json

import lmdb
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.cli import main


def read_split(split_dir):
    urls = sorted(str(p) for p in split_dir.glob("*.tar"))
    out = {}
    for s in wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    ):
        out[s["__key__"]] = (np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]))
    return out


def photo(rng, w, h):
    """A smooth random image (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": False, "quality": 80} if fmt == "WEBP" else {"quality": 90}))
    return buf.getvalue()


def expected_pixels(data, size):
    """The protocol, recomputed independently: shorter side to size (bicubic), central crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def make_db(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k.encode("ascii"), v)
    env.close()


@pytest.fixture(scope="module")
def lsun(tmp_path_factory):
    root = tmp_path_factory.mktemp("lsun")
    rng = np.random.default_rng(0)
    values = {}
    sizes = [(256, 341), (341, 256), (256, 256), (300, 256), (256, 385)]
    for cat in ("bedroom", "church_outdoor"):
        for split, n in (("train", 11), ("val", 3)):
            vals = {}
            for i in range(n):
                key = f"{rng.integers(0, 2**63):016x}{i:024x}"  # 40 hex characters, like LSUN ids
                w, h = sizes[i % len(sizes)]
                img = photo(rng, w, h)
                if i % 4 == 3:
                    img = img.convert("L")  # grayscale jpeg: replicated to RGB
                vals[key] = encode(img, "WEBP" if i % 2 == 0 and i % 4 != 3 else "JPEG")
            if split == "train" and cat == "bedroom":
                vals["0" * 40] = b"RIFF\x00\x00\x00\x00WEBPVP8 garbage"  # undecodable
            make_db(root / f"{cat}_{split}_lmdb", vals)
            values[(cat, split)] = vals
    return root, values


@pytest.mark.parametrize("protocol,stored", [("center", 64), ("glow", 96)])
def test_lsun_protocols_skip_corrupt(lsun, tmp_path, protocol, stored):
    root, values = lsun
    out = tmp_path / "out"
    assert (
        main(
            [
                "lsun",
                "--input",
                str(root),
                "--output",
                str(out),
                "--categories",
                "bedroom,church_outdoor",
                "--protocol",
                protocol,
                "--shard-size",
                "5",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    for split, src in (("train", "train"), ("test", "val")):
        got = read_split(out / split)
        expected_keys = set()
        for label, cat in enumerate(("bedroom", "church_outdoor")):
            for k, v in values[(cat, src)].items():
                if k == "0" * 40:
                    continue
                key = f"{cat}_{k}"
                expected_keys.add(key)
                img, cls = got[key]
                assert cls == label
                np.testing.assert_array_equal(img, expected_pixels(v, stored))
        assert set(got) == expected_keys
        m = json.loads((out / split / "manifest.json").read_text())
        assert m["resolution"] == [stored, stored] and m["protocol"] == protocol
        assert m["classes"] == ["bedroom", "church_outdoor"]
        if split == "train":
            assert m["skipped"] == ["bedroom_" + "0" * 40] and m["skipped_count"] == 1
            assert m["total"] == 22 and sum(s["count"] for s in m["shards"]) == 22
        if protocol == "glow":
            assert m["train_crop"] == 64


def test_unexpected_mode_stops_with_key(tmp_path, capsys):
    root = tmp_path / "in"
    key = "ab" * 20
    make_db(root / "tower_train_lmdb", {key: encode(Image.new("CMYK", (256, 256)), "JPEG")})
    code = main(
        [
            "lsun",
            "--input",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--splits",
            "train",
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and key in err and "CMYK" in err
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    assert not list((tmp_path / "out" / "train").glob("*.tar"))


def test_missing_category_names_path(lsun, tmp_path, capsys):
    code = main(
        [
            "lsun",
            "--input",
            str(lsun[0]),
            "--output",
            str(tmp_path / "o"),
            "--categories",
            "kitchen",
            "--no-progress",
        ]
    )
    assert code == 2 and "kitchen_train_lmdb" in capsys.readouterr().err


def test_two_workers_write_the_same_bytes(lsun, tmp_path):
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        args = ["lsun", "--input", str(lsun[0]), "--output", str(out), "--splits", "train"]
        assert main([*args, "--shard-size", "4", "--workers", workers, "--no-progress"]) == 0
        outs.append({p.name: p.read_bytes() for p in (out / "train").glob("*.tar")})
    assert outs[0] == outs[1] and len(outs[0]) == 6
