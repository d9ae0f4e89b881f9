"""Hostile inputs, class 5 (issue 21): a shard whose bytes changed after conversion is caught by the
training loader (sha256 from the manifest, checked as the shard streams), not trained on silently.

Real shards (the sample set), damaged in ways that keep them parseable: a changed label digit, a
changed tar header field. Loaders run in-process (num_workers=0).
"""

from __future__ import annotations

import pytest

from data_prep.loading import eval_loader, train_loader


def damaged_copy(dataset, tmp_path, split="test"):
    import shutil

    out = tmp_path / "data"
    shutil.copytree(dataset, out)
    shards = sorted((out / split).glob("*.tar"))
    raw = bytearray(shards[1].read_bytes())
    raw[136 + 5] = ord("7") if raw[136 + 5] != ord("7") else ord("6")  # a digit of the first mtime
    shards[1].write_bytes(bytes(raw))
    return out, shards[1]


def test_eval_loader_names_the_corrupt_shard(dataset, tmp_path):
    out, bad = damaged_copy(dataset, tmp_path)
    with pytest.raises(ValueError, match=rf"{bad.name}: corrupt shard \(sha256"):
        list(eval_loader(out / "test", batch_size=16, rank=0, world_size=1))


def test_train_loader_fails_on_the_corrupt_shard(dataset, tmp_path):
    out, bad = damaged_copy(dataset, tmp_path, split="train")
    loader = train_loader(out / "train", batch_size=8, batches_per_epoch=40, shuffle_buffer=0)
    with pytest.raises(ValueError, match=rf"{bad.name}: corrupt shard.*on_corrupt_shard=skip"):
        list(loader)


def test_skip_drops_the_corrupt_shard_and_counts_it(dataset, tmp_path):
    from data_prep import loading

    out, bad = damaged_copy(dataset, tmp_path)
    batches = list(eval_loader(out / "test", batch_size=16, rank=0, world_size=1, on_corrupt="skip"))
    assert sum(len(b) for b in batches) == 48 - 16  # the shard of 16 test images is left out
    assert loading.CORRUPT_SHARDS[str(bad.resolve())] == 1
