"""The built-in sample set: real bundled photographs, split by photo, deterministic, idempotent."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import ensure_sample_shards
from data_prep.sources.sample import TEST_PHOTOS, available_photos, data_dir, plan_crops


def read_split(split_dir):
    urls = sorted(str(p) for p in split_dir.glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    return {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["png"]))) for s in ds}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    return ensure_sample_shards(tmp_path_factory.mktemp("sample") / "s")


def test_default_build(default_set):
    for split, n in (("train", 4000), ("test", 500)):
        m = json.loads((default_set / split / "manifest.json").read_text())
        assert m["source"] == "sample" and m["resolution"] == [32, 32] and m["channels"] == 3
        assert m["total"] == n and m["complete"] is True and m["sample_format"] == "png"
    assert len(read_split(default_set / "test")) == 500


def test_split_by_source_photo(default_set):
    photo_of = {f.rsplit(".", 1)[0]: name for name, files in available_photos().items() for f in files}
    train = {photo_of[k.rsplit("_", 1)[0]] for k in read_split(default_set / "train")}
    test = {photo_of[k.rsplit("_", 1)[0]] for k in read_split(default_set / "test")}
    assert test == set(TEST_PHOTOS) and not train & test and len(train) >= 10
    # the stereo pair is one scene: both halves on the same side
    assert "motorcycle" in train
    mtrain = json.loads((default_set / "train" / "manifest.json").read_text())["photos"]
    mtest = json.loads((default_set / "test" / "manifest.json").read_text())["photos"]
    assert not set(mtrain) & set(mtest)


def test_pixels_are_crops_of_the_bundled_photos(tmp_path):
    out = ensure_sample_shards(tmp_path / "s64", 64, n_train=40, n_test=12)
    got = read_split(out / "test")
    for crop in plan_crops("test", 12, 64, 0):
        photo = Image.open(data_dir() / crop.file).convert("RGB")
        expected = np.asarray(photo.crop(crop.box).resize((64, 64), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(got[crop.key], expected)
        side = crop.box[2] - crop.box[0]
        assert side == crop.box[3] - crop.box[1] and side > 64


def test_idempotent_and_deterministic(tmp_path):
    a = ensure_sample_shards(tmp_path / "a", n_train=300, n_test=60, shard_size=100)
    stamp = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    assert ensure_sample_shards(tmp_path / "a", n_train=300, n_test=60, shard_size=100) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == stamp
    b = ensure_sample_shards(tmp_path / "b", n_train=300, n_test=60, shard_size=100)
    c = ensure_sample_shards(tmp_path / "c", n_train=300, n_test=60, shard_size=100, seed=5)
    for name in ("train/train-000000.tar", "train/train-000002.tar", "test/test-000000.tar"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_invalid_build_repaired_other_settings_replaced_other_dataset_refused(tmp_path):
    out = ensure_sample_shards(tmp_path / "s", n_train=200, n_test=50, shard_size=100)
    good = (out / "train" / "train-000001.tar").read_bytes()
    (out / "train" / "train-000001.tar").write_bytes(good[:5000])
    ensure_sample_shards(tmp_path / "s", n_train=200, n_test=50, shard_size=100)
    assert (out / "train" / "train-000001.tar").read_bytes() == good
    # a shard whose manifest was lost is no longer provably ours: refused, kept, and the user decides
    lost = (out / "test" / "test-000000.tar").read_bytes()
    (out / "test" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"/s/test holds files that no manifest\.json .*test-000000\.tar"):
        ensure_sample_shards(tmp_path / "s", n_train=200, n_test=50, shard_size=100)
    assert (out / "test" / "test-000000.tar").read_bytes() == lost
    (out / "test" / "test-000000.tar").unlink()
    ensure_sample_shards(tmp_path / "s", n_train=200, n_test=50, shard_size=100)
    assert json.loads((out / "test" / "manifest.json").read_text())["complete"] is True
    # other settings: the sample set is derived data, so it is rebuilt ...
    ensure_sample_shards(tmp_path / "s", 64, n_train=200, n_test=50, shard_size=100)
    assert json.loads((out / "train" / "manifest.json").read_text())["resolution"] == [64, 64]
    # ... but shards of another dataset are never replaced
    other = json.loads((out / "test" / "manifest.json").read_text())
    other["config"]["dataset"]["source"] = other["source"] = "cifar10"
    (out / "test" / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another dataset"):
        ensure_sample_shards(tmp_path / "s", 32, n_train=200, n_test=50, shard_size=100)
    assert json.loads((out / "test" / "manifest.json").read_text())["source"] == "cifar10"


def test_foreign_tar_survives_the_sample_builder_as_the_pipeline_calls_it(tmp_path):
    """`pipeline.train --config configs/tiny.yaml data.root=DIR` with `data.source: sample` calls
    ensure_sample_shards(DIR, resolution=..., seed=..., n_train=..., n_test=..., shard_size=...).
    DIR/train holds .tar files but no manifest (a conversion whose manifest was lost): the builder
    must refuse, naming the folder, and leave every byte where it was."""
    root = tmp_path / "imagenet64"
    (root / "train").mkdir(parents=True)
    theirs = {
        "train-000000.tar": b"shard of a real conversion" * 100,
        "mine.tar": b"a user's own archive",
    }
    for name, data in theirs.items():
        (root / "train" / name).write_bytes(data)
    with pytest.raises(ValueError) as info:
        ensure_sample_shards(root, resolution=32, seed=0, n_train=20, n_test=10, shard_size=10)
    message = str(info.value)
    assert str(root / "train") in message and "mine.tar" in message and "another folder" in message
    assert {p.name: p.read_bytes() for p in (root / "train").iterdir()} == theirs
    assert not list(root.rglob("manifest.json")) and not (root / "test").exists()


def test_sample_builder_refuses_a_folder_holding_anything_else(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds notes\.txt besides train/ and test/"):
        ensure_sample_shards(root, n_train=20, n_test=10, shard_size=10)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]  # not even a lock file left
    # a stray file inside a split of an earlier sample build: refused as well, and kept
    out = ensure_sample_shards(tmp_path / "s", n_train=20, n_test=10, shard_size=10)
    (out / "test" / "results.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"results\.csv"):
        ensure_sample_shards(out, n_train=20, n_test=10, shard_size=10)
    assert (out / "test" / "results.csv").read_text() == "1,2"
