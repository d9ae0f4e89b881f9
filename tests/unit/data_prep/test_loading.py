"""Loaders: eval reads every test image exactly once across ranks; train yields exact epochs."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep import ensure_sample_shards
from data_prep.loading import eval_loader, read_manifest, shard_urls, train_loader


def image_hashes(split_dir):
    ds = wds.WebDataset(shard_urls(split_dir), shardshuffle=False, nodesplitter=None, workersplitter=None)
    return Counter(
        hashlib.sha1(np.asarray(Image.open(io.BytesIO(s["png"]))).transpose(2, 0, 1).tobytes()).hexdigest()
        for s in ds
    )


def batch_hashes(batches):
    return Counter(hashlib.sha1(img.numpy().tobytes()).hexdigest() for b in batches for img in b)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 130 test images in shards of 50, 50, 30 (shard mode for up to 3 ranks) ...
    many = ensure_sample_shards(tmp_path_factory.mktemp("many") / "s", n_train=400, n_test=130, shard_size=50)
    # ... and in a single shard (fewer shards than ranks: samples dealt by index)
    one = ensure_sample_shards(tmp_path_factory.mktemp("one") / "s", n_train=400, n_test=130, shard_size=1000)
    return many, one


@pytest.mark.parametrize("layout", ["many", "one"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_reads_every_image_exactly_once(data, layout, world_size):
    root = data[0] if layout == "many" else data[1]
    expected = image_hashes(root / "test")
    assert sum(expected.values()) == 130 and len(expected) == 130
    seen = Counter()
    for rank in range(world_size):
        batches = list(eval_loader(root / "test", batch_size=16, rank=rank, world_size=world_size))
        assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 32, 32) for b in batches)
        seen += batch_hashes(batches)
    assert seen == expected


def test_eval_with_loader_workers_and_labels(data):
    root = data[0]
    seen = Counter()
    for rank in range(2):
        batches = list(
            eval_loader(root / "test", batch_size=8, rank=rank, world_size=2, num_workers=2, with_labels=True)
        )
        assert all((labels == -1).all() for _, labels in batches)  # the sample set has no labels
        seen += batch_hashes(images for images, _ in batches)
    assert seen == image_hashes(root / "test")


def test_eval_center_crop(data):
    (batch,) = list(eval_loader(data[1] / "test", batch_size=200, center_crop=24))
    full = torch.cat(list(eval_loader(data[1] / "test", batch_size=200)))
    assert batch.shape == (130, 3, 24, 24) and torch.equal(batch, full[:, :, 4:28, 4:28])


def test_train_exact_epochs_shapes_and_reproducibility(data, monkeypatch):
    root = data[0] / "train"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = train_loader(
        root, batch_size=32, batches_per_epoch=7, shuffle_buffer=100, seed=3, random_crop=28, random_flip=True
    )
    assert len(loader) == 7
    epoch0, epoch1 = list(loader), list(loader)
    assert len(epoch0) == len(epoch1) == 7
    assert all(b.shape == (32, 3, 28, 28) and b.dtype == torch.uint8 for b in epoch0 + epoch1)
    assert not torch.equal(epoch0[0], epoch1[0])
    again = list(
        train_loader(
            root,
            batch_size=32,
            batches_per_epoch=7,
            shuffle_buffer=100,
            seed=3,
            random_crop=28,
            random_flip=True,
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again, strict=True))
    resumed = train_loader(
        root, batch_size=32, batches_per_epoch=7, shuffle_buffer=100, seed=3, random_crop=28, random_flip=True
    )
    resumed.set_epoch(1)  # a restarted run continues at epoch 1 and sees what epoch 1 saw
    assert all(torch.equal(a, b) for a, b in zip(epoch1, list(resumed), strict=True))
    monkeypatch.setenv("RANK", "0")
    other_rank = list(
        train_loader(
            root,
            batch_size=32,
            batches_per_epoch=7,
            shuffle_buffer=100,
            seed=3,
            random_crop=28,
            random_flip=True,
        )
    )
    assert not torch.equal(epoch0[0], other_rank[0])


def test_train_with_workers_still_exact(data):
    loader = train_loader(
        data[0] / "train", batch_size=16, batches_per_epoch=5, num_workers=2, with_labels=True
    )
    batches = list(loader)
    assert len(batches) == 5
    images, labels = batches[0]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (16,)


def test_read_manifest_errors_name_the_file(data, tmp_path):
    assert read_manifest(data[0] / "test")["total"] == 130
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(tmp_path)
    m = json.loads((data[0] / "test" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        shard_urls(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        train_loader(tmp_path, batch_size=2, batches_per_epoch=1)
