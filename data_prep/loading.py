"""Reading shards for training and evaluation: uint8 (B, C, H, W) batches, torch + webdataset only.

Training (`train_loader`): shards are resampled with replacement, so the stream never ends and
every rank yields exactly `batches_per_epoch` full batches per epoch whatever the shard sizes (no
DDP hang on uneven shards). webdataset 1.0's `WebDataset(resampled=True)` builds its
`ResampledShards` seeded from the clock and ignores `shardshuffle`/`nodesplitter` for the shard
draw, so the pipeline is assembled from the same webdataset stages by hand to make the stream a
function of (seed, epoch, rank, loader worker): ranks and workers draw different shards, and a
rerun with the same seed sees the same images.

Evaluation (`eval_loader`): no resampling, no shuffling; every test image is read exactly once
across ranks (shards dealt to ranks round robin; with fewer shards than ranks, samples dealt by
index). Reduce per-image sums across ranks, not means: ranks may get different batch counts.

Integrity: every shard's bytes are hashed (sha256) as they stream in and compared with the
manifest's `sha256` at the shard's end (`CorruptShardError` naming the shard). `on_corrupt="fail"`
(default) raises it, stopping training; `on_corrupt="skip"` holds a shard's samples until its digest
has checked (memory: one shard's raw bytes per reader), drops a corrupt shard's samples with a
warning and counts it in `CORRUPT_SHARDS`. A local shard found intact is not hashed again by the
same process while its inode, size and mtime stay the same (`_VERIFIED`). Cost: benchmarks/data.py.

Object storage: a split given as a URI (``s3://bucket/prefix/train``) is read the same way, each
shard streamed in read-ahead ranges through fsspec (data_prep/storage.py), never copied to local disk
first; the shard lists, splitting, seeds and resampling are the same as for local files.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.utils import pytorch_worker_info

from data_prep.manifest import read_manifest
from data_prep.shard_reading import CORRUPT_SHARDS, CorruptShardError, VerifiedTarSamples, tar_samples
from data_prep.storage import RemotePath, as_path

__all__ = [
    "CORRUPT_SHARDS", "CorruptShardError", "eval_loader", "read_manifest", "shard_urls", "train_loader",
]  # fmt: skip


def _worker_context(num_workers: int):
    """forkserver for DataLoader workers (fork deadlocks inside Ray workers), with this module preloaded.

    Workers are not persistent (each epoch needs fresh seeds), so they start every epoch; forking
    them from a server that already imported torch and webdataset makes that milliseconds, not
    seconds. The preload list only matters before the process's forkserver first starts.
    """
    if num_workers == 0:
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def shard_urls(split_dir: str | os.PathLike) -> list[str]:
    """Absolute paths or URIs of the shards, in manifest order (ValueError if the manifest is bad)."""
    return list(shard_digests(split_dir))


def shard_digests(split_dir: str | os.PathLike) -> dict[str, str]:
    """{absolute path or URI: manifest sha256} of the shards, in manifest order."""
    root = as_path(split_dir)
    root = root if isinstance(root, RemotePath) else Path(root).resolve()
    return {str(root / s["name"]): s["sha256"] for s in read_manifest(root)["shards"]}


def _seed(*parts: int | str) -> int:
    # SeedSequence mixes well and, unlike hash(str), does not change with PYTHONHASHSEED.
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class _Stream:
    """Picklable per-epoch seed source; DataLoader workers get a copy made after the epoch was set."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def value(self, stage: str) -> int:
        rank, _, worker, _ = pytorch_worker_info()
        return _seed(self.seed, self.epoch, rank, worker, stage)

    def shard_seed(self) -> int:
        return self.value("shards")


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8 (grayscale gets C = 1)."""
    # formats=("PNG",) skips probing every other plugin first (~10% of a 64x64 decode).
    with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


class _Decode:
    def __init__(self, *, crop: int | None, random_crop: bool, flip: bool, stream: _Stream | None):
        self.crop, self.random_crop, self.flip, self.stream = crop, random_crop, flip, stream
        self._rng: random.Random | None = None
        self._rng_epoch = -1

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        arr = decode_png(sample["png"])
        label = int(sample["cls"]) if "cls" in sample else -1
        if self.crop is None and not self.flip:
            return arr, label
        rng = self._rng_for_epoch()
        if self.crop is not None:
            h, w = arr.shape[:2]
            c = self.crop
            if c > h or c > w:
                raise ValueError(f"crop {c} larger than image {h}x{w} (key {sample.get('__key__')})")
            top, left = (
                (rng.randint(0, h - c), rng.randint(0, w - c))
                if self.random_crop
                else ((h - c) // 2, (w - c) // 2)
            )
            arr = arr[top : top + c, left : left + c]
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return arr, label

    def _rng_for_epoch(self) -> random.Random:
        epoch = self.stream.epoch if self.stream else 0
        if self._rng is None or epoch != self._rng_epoch:
            self._rng = random.Random(self.stream.value("augment") if self.stream else 0)
            self._rng_epoch = epoch
        return self._rng


class _Collate:
    def __init__(self, with_labels: bool):
        self.with_labels = with_labels

    def __call__(self, items: list[tuple[np.ndarray, int]]):
        # Transposing each HWC image into the stack is ~50x faster than permute().contiguous() on the batch.
        images = torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a, _ in items]))
        if not self.with_labels:
            return images
        return images, torch.tensor([lab for _, lab in items], dtype=torch.int64)


class _Shuffle:
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, stream: _Stream):
        self.bufsize, self.stream = bufsize, stream

    def __call__(self, src: Iterator) -> Iterator:
        rng = random.Random(self.stream.value("shuffle"))
        buf: list = []
        for item in src:
            if len(buf) < self.bufsize:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf


class TrainLoader:
    """Iterable of exactly `len(self)` batches per pass; each pass is a new epoch with new draws."""

    def __init__(
        self, loader: wds.WebLoader, stream: _Stream, shards: wds.ResampledShards, batches_per_epoch: int
    ):
        self.loader, self.stream, self.shards = loader, stream, shards
        self.batches_per_epoch = batches_per_epoch
        self.next_epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next pass (a resumed run sets its saved epoch to see fresh draws)."""
        self.next_epoch = epoch

    def __iter__(self):
        self.stream.epoch = self.next_epoch
        self.next_epoch += 1
        # ResampledShards counts its own passes (in-process only); pin it so the draws depend on
        # our epoch alone, and a resumed run that calls set_epoch(e) sees what epoch e saw.
        self.shards.epoch = -1
        return iter(self.loader)


def train_loader(
    split_dir: str | os.PathLike,
    *,
    batch_size: int,
    batches_per_epoch: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    random_crop: int | None = None,
    random_flip: bool = False,
    with_labels: bool = False,
    on_corrupt: str = "fail",
    verify: bool = True,
    pin_memory: bool = False,
) -> TrainLoader:
    """Endless resampled shard stream cut into epochs of `batches_per_epoch` full batches per rank.

    Yields uint8 tensors (B, C, H, W) (or `(images, labels int64 (B,))` with `with_labels`; -1 when
    the split has no labels). `random_crop=c` takes a uniform c x c crop (e.g. 64 of LSUN's stored 96
    under the glow protocol); `random_flip` mirrors half the images left-right.
    Rank and world size come from RANK/WORLD_SIZE (set by Ray Train) or torch.distributed.
    `pin_memory`: batches in page-locked memory (DataLoader's pin thread), for non-blocking GPU copies.
    """
    if batch_size < 1 or batches_per_epoch < 1:
        raise ValueError(
            f"batch_size and batches_per_epoch must be >= 1, got {batch_size}, {batches_per_epoch}"
        )
    digests = shard_digests(split_dir)
    urls = list(digests)
    stream = _Stream(seed)
    shards = wds.ResampledShards(urls, worker_seed=stream.shard_seed, deterministic=True)
    stages = [shards, VerifiedTarSamples(digests, on_corrupt) if verify else tar_samples]
    if shuffle_buffer > 1:
        stages.append(_Shuffle(shuffle_buffer, stream))
    stages += [
        wds.map(_Decode(crop=random_crop, random_crop=True, flip=random_flip, stream=stream)),
        wds.batched(batch_size, collation_fn=_Collate(with_labels), partial=False),
    ]
    dataset = wds.DataPipeline(*stages)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context=_worker_context(num_workers),
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    # with_epoch on the loader (not the dataset) counts batches per rank, summed over its workers.
    return TrainLoader(loader.with_epoch(batches_per_epoch), stream, shards, batches_per_epoch)


class _TakeEvery:
    """Keep sample i of this reader's stream when i % total == index (exact dealing, no duplicates)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        _, _, worker, num_workers = pytorch_worker_info()
        total, index = self.world_size * num_workers, self.rank * num_workers + worker
        for i, item in enumerate(src):
            if i % total == index:
                yield item


def eval_loader(
    split_dir: str | os.PathLike,
    *,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    center_crop: int | None = None,
    with_labels: bool = False,
    on_corrupt: str = "fail",
    verify: bool = True,
):
    """Every image of the split exactly once across ranks, in uint8 (B, C, H, W) batches (last may be short).

    With at least `world_size` shards, rank r reads shards r, r + world_size, ... (and its loader
    workers split those shards); otherwise every rank reads all shards and keeps samples whose index
    is r mod world_size. `center_crop=c` takes the central c x c crop (LSUN glow protocol: 64 of 96).
    """
    if rank is None or world_size is None:
        env_rank, env_world, _, _ = pytorch_worker_info()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    digests = shard_digests(split_dir)
    urls = list(digests)
    read = VerifiedTarSamples(digests, on_corrupt) if verify else tar_samples
    decode = wds.map(_Decode(crop=center_crop, random_crop=False, flip=False, stream=None))
    batch = wds.batched(batch_size, collation_fn=_Collate(with_labels), partial=True)
    if len(urls) >= world_size:
        mine = urls[rank::world_size]
        dataset = wds.DataPipeline(wds.SimpleShardList(mine), wds.split_by_worker, read, decode, batch)
        num_workers = min(num_workers, len(mine))
    else:
        dataset = wds.DataPipeline(
            wds.SimpleShardList(urls), read, _TakeEvery(rank, world_size), decode, batch
        )
    if num_workers == 0:
        return dataset
    return wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context=_worker_context(num_workers),
    )
