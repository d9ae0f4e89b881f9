"""Shards for training: make sure they exist and fit the model, then open data_prep's loaders.

The loaders themselves (resampled training stream split by rank and loader worker with a fixed number
of batches per rank, evaluation reading every test image exactly once across ranks) live in
data_prep/loading.py; this module only connects them to the config.

``data.root`` may be an object-storage URI (``s3://bucket/prefix``): the loaders stream the shards
from there. A missing sample set is then built in a local temporary folder and uploaded
(``data_prep.upload``: shards first, each checked, the manifest last).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from data_prep.loading import eval_loader, train_loader
from data_prep.manifest import read_manifest
from data_prep.storage import RemotePath, as_path
from pipeline.config import DataConfig


def ensure_data(cfg: DataConfig, image_shape: tuple[int, int, int]) -> Path | RemotePath:
    """Check both splits, first building the sample set if ``cfg.source`` is ``sample`` and it is
    missing or incomplete. Called once per driver process (``pipeline.train``, ``tune.search``,
    ``pipeline.compare``), never by the workers, which read what the driver checked.

    ValueError when a split is missing or its images do not have the model's (C, H, W).
    """
    root = as_path(cfg.root)
    channels, height, width = image_shape
    if cfg.source == "sample":
        from data_prep.sources.sample import ensure_sample_shards

        if height != width:
            raise ValueError(f"model.image_shape: the sample set is square, got {height}x{width}")
        s = cfg.sample

        def build(out: Path) -> None:
            ensure_sample_shards(
                out,
                resolution=height,
                seed=s.seed,
                n_train=s.num_train,
                n_test=s.num_test,
                shard_size=s.shard_size,
            )

        if isinstance(root, RemotePath):
            _ensure_remote_sample(root, build)
        else:
            build(root)
    for split in ("train", "test"):
        try:
            manifest = read_manifest(root / split)
        except ValueError as e:
            raise ValueError(f"data.root: {e} (build shards with `python -m data_prep`)") from e
        crop = train_crop(root)
        found = (int(manifest["channels"]), *((crop, crop) if crop else map(int, manifest["resolution"])))
        if found != tuple(image_shape):
            raise ValueError(
                f"model.image_shape {tuple(image_shape)} does not match the {split} shards in {root} "
                f"(channels, height, width = {found})"
            )
    return root


def _ensure_remote_sample(root: RemotePath, build) -> None:
    """Build the sample set locally and upload it, unless both splits' manifests are in ``root``
    already (a sample build there with other settings is refused by the shape check that follows)."""
    from data_prep.upload import upload_dataset

    try:
        for split in ("train", "test"):
            read_manifest(root / split)
        return
    except ValueError:
        pass
    with tempfile.TemporaryDirectory(prefix="eiw-sample-") as tmp:
        build(Path(tmp))
        upload_dataset(Path(tmp), root)


def train_crop(root: str | Path | RemotePath) -> int | None:
    """The crop side the train manifest asks for (LSUN's Glow protocol stores 96, trains on 64 crops)."""
    crop = read_manifest(as_path(root) / "train").get("train_crop")
    return int(crop) if crop else None


def make_train_loader(cfg: DataConfig, *, seed: int, pin_memory: bool = False, micro_batches: int = 1):
    """Endless resampled stream, ``cfg.batches_per_epoch`` uint8 (B, C, H, W) batches per pass, each
    one optimizer step: B = ``cfg.batch_size x micro_batches`` (``optim.accumulate``; the step
    splits it). In page-locked memory with ``pin_memory``, for asynchronous copies to a GPU."""
    return train_loader(
        as_path(cfg.root) / "train",
        batch_size=cfg.batch_size * micro_batches,
        batches_per_epoch=cfg.batches_per_epoch,
        num_workers=cfg.loader_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=seed,
        random_crop=train_crop(cfg.root),
        random_flip=cfg.random_flip,
        on_corrupt=cfg.on_corrupt_shard,
        pin_memory=pin_memory,
    )


def make_eval_loader(cfg: DataConfig, *, rank: int, world_size: int):
    """This rank's share of the test split (every image exactly once across ranks; the central crop
    when training takes random crops)."""
    return eval_loader(
        as_path(cfg.root) / "test",
        batch_size=cfg.eval_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.loader_workers,
        center_crop=train_crop(cfg.root),
        on_corrupt=cfg.on_corrupt_shard,
    )


def train_batches(loader, *, start: int, total: int, per_epoch: int) -> Iterator[Tensor]:
    """The batches of steps ``start + 1 .. total`` from ``make_train_loader``'s loader.

    Each epoch's stream is fixed by its ``set_epoch``; a resumed run replays its epoch's first
    ``start % per_epoch`` batches, so it sees the same data order as a run without a restart.
    """
    step = start
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < offset:
                continue
            yield batch
            step += 1
            if step >= total or (step % per_epoch == 0):
                break
