"""The conversion engine shared by every source: plan shards, resume, run workers, write the manifest.

A source (see `SplitSource`) is a cheap, picklable description of one split: how many source
*positions* it has and how to turn positions [start, stop) into samples. Shard i always holds
positions [i * shard_size, (i + 1) * shard_size), whoever writes it, so a shard's bytes depend only on
the input and the config, never on the number of workers or on what an earlier run got through.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import multiprocessing as mp
import queue as queue_mod
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep import manifest as mf
from data_prep import ownership
from data_prep.images import DEFAULT_PNG_LEVEL, set_png_level
from data_prep.writer import Sample, ShardFile, ShardRecord, Skipped, sha256_file

TICK = 256  # progress-bar granularity, in source positions


class ConfigMismatch(ValueError):
    """The output folder holds shards made from another dataset or with other settings."""


class SplitSource(abc.ABC):
    """One split of one dataset. Subclasses are dataclasses holding paths and options, never pixels."""

    split: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of source positions (images, including ones that may turn out undecodable)."""

    @abc.abstractmethod
    def dataset_config(self) -> dict:
        """What makes two outputs the same dataset (source, resolution, protocol, ...); JSON-able."""

    @abc.abstractmethod
    def inputs(self) -> list:
        """Fingerprint of the input files of this split (names and sizes); JSON-able."""

    @abc.abstractmethod
    def manifest_fields(self) -> dict:
        """resolution, channels, label_offset, notes, ... merged into the manifest."""

    def plan(self, shard_size: int) -> SplitSource:
        """Hook for sources that need a pre-pass to jump to shard starts (LSUN); runs in the parent."""
        return self

    @abc.abstractmethod
    def iter_range(self, start: int, stop: int) -> Iterator[Sample | Skipped]:
        """Exactly one Sample or Skipped per position in [start, stop), in order. Runs in a worker."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    output: Path
    shard_size: int = 10_000
    workers: int = 1
    overwrite: bool = False
    seed: int = 0
    command: tuple[str, ...] = ()
    progress: bool = True
    png_level: int = DEFAULT_PNG_LEVEL
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"--png-level must be 0..9, got {self.png_level}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


def convert_split(source: SplitSource, opts: RunOptions) -> dict:
    """Convert one split into `opts.output/source.split`, resuming finished shards; returns the manifest."""
    n = len(source)
    if n == 0:
        raise ValueError(f"split {source.split!r} of {source.dataset_config().get('source')} has no images")
    split_dir = Path(opts.output) / source.split
    split_dir.mkdir(parents=True, exist_ok=True)
    ownership.require_inside(split_dir, opts.output)
    oid = ownership.output_id(opts.output)
    config = {
        "dataset": source.dataset_config(),
        "split": source.split,
        "positions": n,
        "shard_size": opts.shard_size,
        "seed": opts.seed,
        "inputs": source.inputs(),
        "png_level": opts.png_level,
        **opts.extra_config,
    }
    config = json.loads(json.dumps(config))  # tuples -> lists, so it compares equal to what is read back
    n_shards = math.ceil(n / opts.shard_size)
    planned = [mf.shard_name(source.split, i) for i in range(n_shards)]
    with ownership.locked(split_dir / ownership.LOCK_NAME, oid):
        ownership.remove_temporaries(split_dir)
        # Checked before anything is deleted: files nobody recorded are never ours to replace.
        ownership.refuse_unrecorded_shards(split_dir)
        _check_siblings(split_dir, config["dataset"], opts.overwrite, opts.output)
        previous, manifest_complete = _load_previous(split_dir, config, opts.overwrite, opts.output)
        done = _still_valid(previous, split_dir, n_shards, opts.workers)
        pending = [i for i in range(n_shards) if i not in done]
        manifest_path = split_dir / mf.MANIFEST_NAME
        if not pending and manifest_complete:
            if opts.progress:
                print(f"{split_dir}: complete, {n_shards} shards verified; nothing to do", file=sys.stderr)
            return mf.load_json(manifest_path)
        # Resuming deletes and rewrites what the records name: only when they are provably ours.
        ownership.require_ours(split_dir, opts.output)
        # From here on the split is incomplete: the manifest must not claim otherwise. The progress
        # record names every planned shard first, so each file this run may write is on record.
        record = ProgressRecord(
            split_dir=split_dir, config=config, planned=planned, command=opts.command, output_id=oid
        )
        record.write(done)
        manifest_path.unlink(missing_ok=True)
        for i in pending:
            (split_dir / mf.shard_name(source.split, i)).unlink(missing_ok=True)
        if pending:
            _run(source.plan(opts.shard_size), split_dir, pending, n, opts, record, done)
        assert sorted(done) == list(range(n_shards)), "every shard must be accounted for"
        manifest = _build_manifest(source, opts, config, [done[i] for i in range(n_shards)])
        manifest[ownership.SIGNATURE_KEY] = ownership.signature("manifest", oid)
        mf.write_json_atomic(manifest_path, manifest)
        (split_dir / mf.PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def _check_siblings(split_dir: Path, dataset: dict, overwrite: bool, output: Path) -> None:
    """Refuse to put a split of one dataset next to splits of another (with --overwrite: delete those)."""
    for sibling in sorted(p for p in split_dir.parent.iterdir() if p.is_dir() and p != split_dir):
        for name in (mf.MANIFEST_NAME, mf.PROGRESS_NAME):
            path = sibling / name
            if path.exists():
                other = mf.recorded_dataset(mf.load_json(path))
                if other != dataset and overwrite:
                    ownership.remove_recorded(sibling, output)
                elif other != dataset:
                    diffs = "; ".join(mf.config_differences(other or {}, dataset))
                    raise ConfigMismatch(
                        f"{split_dir.parent} already holds another dataset in {sibling.name}/ "
                        f"({diffs}); use another --output or --overwrite"
                    )
                break


def _load_previous(
    split_dir: Path, config: dict, overwrite: bool, output: Path
) -> tuple[dict[int, ShardRecord], bool]:
    """Shards an earlier run of the same config finished (not yet re-hashed), and whether it completed."""
    for name, complete_key in ((mf.MANIFEST_NAME, "complete"), (mf.PROGRESS_NAME, None)):
        path = split_dir / name
        if not path.exists():
            continue
        record = mf.load_json(path)
        if overwrite:
            ownership.remove_recorded(split_dir, output)
            return {}, False
        old = record.get("config")
        if old != config:
            diffs = mf.config_differences(old or {}, config)
            raise ConfigMismatch(
                f"{split_dir} holds shards of another dataset/config ({'; '.join(diffs)}); "
                "use another --output or pass --overwrite to replace them"
            )
        recs = {}
        for s in record.get("shards", []):
            i = s.get("index", _index_from_name(s["name"]))
            recs[i] = ShardRecord(
                index=i,
                name=s["name"],
                count=s["count"],
                sha256=s["sha256"],
                skipped=list(s.get("skipped", [])),
            )
        return recs, bool(complete_key and record.get(complete_key) is True)
    return {}, False


def _index_from_name(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".")[0])


def _still_valid(previous: dict[int, ShardRecord], split_dir: Path, n_shards: int, workers: int):
    """Keep only recorded shards whose file exists and hashes to the recorded sha256."""
    candidates = [r for i, r in sorted(previous.items()) if i < n_shards and (split_dir / r.name).is_file()]
    paths = [split_dir / r.name for r in candidates]
    if workers > 1 and len(paths) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(paths))) as pool:
            hashes = pool.map(sha256_file, paths)
    else:
        hashes = [sha256_file(p) for p in paths]
    return {r.index: r for r, h in zip(candidates, hashes, strict=True) if h == r.sha256}


@dataclass(frozen=True, kw_only=True)
class ProgressRecord:
    """progress.json of an unfinished conversion: its config, the shard files it will write
    (`planned`, what lets a later run delete them), those finished, and the command to resume it."""

    split_dir: Path
    config: dict
    planned: list[str]
    command: tuple[str, ...]
    output_id: str

    def write(self, done: dict[int, ShardRecord]) -> None:
        shards = [{"index": i, **done[i].manifest_entry()} for i in sorted(done)]
        record = {
            "config": self.config,
            "complete": False,
            "planned": self.planned,
            "shards": shards,
            "command": list(self.command),
            ownership.SIGNATURE_KEY: ownership.signature("progress", self.output_id),
        }
        mf.write_json_atomic(self.split_dir / mf.PROGRESS_NAME, record)


def _chunks(pending: list[int], workers: int) -> list[list[int]]:
    """Runs of consecutive shard indices, about one per worker (sources stream within a run)."""
    target = max(1, math.ceil(len(pending) / workers))
    chunks: list[list[int]] = []
    for i in pending:
        if chunks and chunks[-1][-1] == i - 1 and len(chunks[-1]) < target:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


_report: Callable[[tuple], None] | None = None


def _init_worker(q) -> None:
    global _report
    _report = q.put


def _run_chunk(
    source: SplitSource, split_dir: Path, indices: list[int], shard_size: int, n: int, png_level: int
):
    """Write shards `indices` (consecutive). Runs in a worker process or inline."""
    assert _report is not None
    set_png_level(png_level)
    start, stop = indices[0] * shard_size, min((indices[-1] + 1) * shard_size, n)
    items = source.iter_range(start, stop)
    records = []
    for idx in indices:
        lo, hi = idx * shard_size, min((idx + 1) * shard_size, n)
        shard = ShardFile(split_dir / mf.shard_name(source.split, idx), index=idx)
        try:
            for pos in range(lo, hi):
                item = next(items, None)
                assert item is not None, f"{type(source).__name__}.iter_range ended early at {pos}"
                shard.add(item) if isinstance(item, Sample) else shard.skip(item)
                if (pos - lo + 1) % TICK == 0:
                    _report(("tick", TICK))
            record = shard.finish()
        except BaseException:
            shard.abort()
            raise
        _report(("tick", (hi - lo) % TICK))
        _report(("shard", record))
        records.append(record)
    assert next(items, None) is None, f"{type(source).__name__}.iter_range yielded too much"
    return records


def _run(source, split_dir, pending, n, opts, record: ProgressRecord, done) -> None:
    global _report
    total = sum(min((i + 1) * opts.shard_size, n) - i * opts.shard_size for i in pending)
    desc = f"{source.dataset_config().get('source')} {source.split}"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not opts.progress, file=sys.stderr)

    def on_message(msg: tuple) -> None:
        kind, value = msg
        if kind == "tick":
            bar.update(value)
        elif value.index not in done:
            done[value.index] = value
            record.write(done)

    chunks = _chunks(pending, opts.workers)
    try:
        if opts.workers == 1 or len(chunks) == 1:
            _report = on_message
            try:
                for chunk in chunks:
                    _run_chunk(source, split_dir, chunk, opts.shard_size, n, opts.png_level)
            finally:
                _report = None
        else:
            _run_pool(source, split_dir, chunks, n, opts, on_message)
    finally:
        bar.close()


def _run_pool(source, split_dir, chunks, n, opts, on_message) -> None:
    # spawn, not fork: the parent may hold threads (tqdm's monitor, torch) and open lmdb handles.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pool = ctx.Pool(min(opts.workers, len(chunks)), initializer=_init_worker, initargs=(q,))
    try:
        results = [
            pool.apply_async(_run_chunk, (source, split_dir, c, opts.shard_size, n, opts.png_level))
            for c in chunks
        ]
        while results:
            with contextlib.suppress(queue_mod.Empty):
                on_message(q.get(timeout=0.2))
            for r in [r for r in results if r.ready()]:
                results.remove(r)
                for record in r.get():  # re-raises a worker's exception here
                    on_message(("shard", record))
        while True:
            try:
                on_message(q.get_nowait())
            except queue_mod.Empty:
                break
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _build_manifest(source: SplitSource, opts: RunOptions, config: dict, records: list[ShardRecord]) -> dict:
    skipped = [k for r in records for k in r.skipped]
    fields = source.manifest_fields()
    return {
        "source": source.dataset_config()["source"],
        "split": source.split,
        "resolution": fields.pop("resolution"),
        "channels": fields.pop("channels"),
        "n_bits": 8,
        "sample_format": "png",
        **fields,
        "shard_size": opts.shard_size,
        "png_level": opts.png_level,
        "shards": [r.manifest_entry() for r in records],
        "total": sum(r.count for r in records),
        "skipped": skipped,
        "skipped_count": len(skipped),
        "command": list(opts.command),
        "seed": opts.seed,
        "config": config,
        "complete": True,
    }
