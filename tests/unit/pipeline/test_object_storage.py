"""Object storage without a server: fsspec's in-memory filesystem (``memory://``) stands in for a bucket.
The S3 end-to-end test is tests/integration/test_object_storage.py."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from data_prep.loading import eval_loader, shard_urls, train_loader
from data_prep.manifest import MANIFEST_NAME, read_manifest
from data_prep.storage import RemotePath, as_path, is_uri
from data_prep.upload import upload_dataset
from pipeline.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    ObjectCheckpoints,
    checkpoint_name,
    list_checkpoints,
    read_newest_intact,
    write_checkpoint,
)
from pipeline.checkpoint_writer import CheckpointWriter, cpu_copy
from pipeline.runtime import LocalRuntime


@pytest.fixture
def bucket() -> RemotePath:
    return RemotePath(f"memory://bucket-{uuid.uuid4().hex[:8]}/prefix")


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    from data_prep.sources.sample import ensure_sample_shards

    root = tmp_path_factory.mktemp("shards") / "tiny"
    return ensure_sample_shards(root, resolution=32, n_train=48, n_test=24, shard_size=8)


def full_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {},
            "rng": [], "config": {}, "mlflow_run_id": None, "skipped_steps": 0,
            "test_bits_per_dim": 0.0}  # fmt: skip


def test_paths_and_uris():
    assert is_uri("s3://b/p") and is_uri("gs://b") and not is_uri("/tmp/x") and not is_uri("file:///tmp/x")
    assert as_path("file:///tmp/x") == Path("/tmp/x")
    p = as_path("s3://bucket/runs/") / "checkpoints" / "a"
    assert isinstance(p, RemotePath) and str(p) == "s3://bucket/runs/checkpoints/a"
    assert p.name == "a" and str(p.parent) == "s3://bucket/runs/checkpoints"
    with pytest.raises(ValueError, match="bucket"):
        RemotePath("s3://")


def test_remote_path_reads_writes_and_lists(bucket):
    (bucket / "d" / "x.txt").write_text("hello")
    (bucket / "d" / "sub" / "y").write_bytes(b"12")
    assert (bucket / "d" / "x.txt").read_text() == "hello" and (bucket / "d" / "x.txt").is_file()
    assert (bucket / "d").is_dir() and not (bucket / "nothing").exists()
    assert [p.name for p in (bucket / "d").iterdir()] == ["sub", "x.txt"]
    (bucket / "d" / "x.txt").unlink()
    (bucket / "d" / "x.txt").unlink(missing_ok=True)
    (bucket / "d").rmtree()
    assert not (bucket / "d").exists()


def test_object_checkpoints_commit_state_last_and_keep_the_newest(bucket, tmp_path):
    store = ObjectCheckpoints(bucket / "run", num_to_keep=2)
    order: list[str] = []
    real = RemotePath.upload_from

    def recording(self, local):
        order.append(self.name)
        real(self, local)

    RemotePath.upload_from = recording
    try:
        for step in (2, 4, 6):
            staged = store.staging(checkpoint_name(step))
            write_checkpoint(staged, full_state(step), "a: 1\n")
            store.commit(staged, checkpoint_name(step))
            assert not staged.exists()
    finally:
        RemotePath.upload_from = real
    # state.pt, the commit point, last; its digest (pipeline/checkpoint_digest.py) before it
    assert order == [CONFIG_FILE, "state.pt.sha256", STATE_FILE] * 3
    assert [p.name for p in store.all()] == [checkpoint_name(4), checkpoint_name(6)]
    assert not (bucket / "run" / checkpoint_name(2)).exists()
    # An upload cut short before state.pt: the folder is no checkpoint at all.
    (bucket / "run" / checkpoint_name(8) / CONFIG_FILE).write_text("a: 1\n")
    assert [p.name for p in list_checkpoints(bucket / "run")] == [checkpoint_name(4), checkpoint_name(6)]


def test_a_truncated_remote_checkpoint_falls_back_to_the_one_before(bucket):
    store = ObjectCheckpoints(bucket / "run", num_to_keep=3)
    for step in (2, 4):
        staged = store.staging(checkpoint_name(step))
        write_checkpoint(staged, full_state(step), "")
        store.commit(staged, checkpoint_name(step))
    latest = bucket / "run" / checkpoint_name(4) / STATE_FILE
    latest.write_bytes(latest.read_bytes()[:300])
    found = read_newest_intact(store.all()[::-1])
    assert found is not None and found.state["step"] == 2
    assert found.directory == bucket / "run" / checkpoint_name(2)
    assert str(latest) in found.unreadable[0] and "unreadable checkpoint" in found.unreadable[0]


def test_local_runtime_writes_to_a_bucket_in_the_background(bucket):
    runtime = LocalRuntime(bucket / "run", num_to_keep=2, device=torch.device("cpu"))
    state = full_state(2)
    copy = cpu_copy(state)
    runtime.save_checkpoint(lambda d: write_checkpoint(d, copy, ""), name=checkpoint_name(2), metrics={})
    state["model"]["w"].add_(100.0)  # training goes on changing the live tensors: the copy is unaffected
    runtime.flush_checkpoints()
    with runtime.resume_candidates() as candidates:
        found = read_newest_intact(candidates)
    assert found is not None and torch.equal(found.state["model"]["w"], torch.full((3,), 2.0))
    assert runtime.run_dir == bucket / "run"


def test_the_writer_keeps_one_write_in_flight_and_raises_its_error_at_flush():
    writer = CheckpointWriter()
    release, events = threading.Event(), []

    def slow():
        release.wait(5)
        events.append("first done")

    writer.submit(slow)
    assert writer.busy
    threading.Timer(0.2, release.set).start()
    start = time.perf_counter()
    writer.submit(lambda: events.append("second"))  # waits for the first
    assert events[0] == "first done" and time.perf_counter() - start >= 0.1
    writer.flush()
    assert events == ["first done", "second"]

    def failing():
        raise OSError(28, "No space left on device")

    writer.submit(failing)  # returns at once
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    writer.flush()  # reported once


def test_uploaded_shards_read_like_the_local_ones(local_shards, bucket):
    uris = upload_dataset(local_shards, bucket / "data")
    assert uris == [str(bucket / "data" / "test"), str(bucket / "data" / "train")]
    remote = bucket / "data"
    assert read_manifest(remote / "train") == read_manifest(local_shards / "train")
    assert all(u.startswith("memory://") for u in shard_urls(remote / "train"))

    def batches(root, **kw):
        loader = train_loader(root / "train", batch_size=4, batches_per_epoch=5, seed=3, **kw)
        loader.set_epoch(1)
        return [b.clone() for b in loader]

    for got, want in zip(batches(remote), batches(local_shards), strict=True):
        assert torch.equal(got, want)  # same resampling, same shuffle, same images
    for world in (2, 4):  # every test image exactly once across ranks, as locally
        seen = [b for r in range(world) for b in eval_loader(remote / "test", batch_size=5, rank=r,
                                                              world_size=world)]  # fmt: skip
        assert sum(b.shape[0] for b in seen) == 24


def test_an_upload_refuses_a_local_shard_that_differs_from_its_manifest(local_shards, bucket, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(local_shards / "train", copy / "train")
    shard = copy / "train" / read_manifest(copy / "train")["shards"][1]["name"]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(ValueError, match="sha256 differs"):
        upload_dataset(copy, bucket / "data")
    assert not (bucket / "data" / "train" / MANIFEST_NAME).exists()
