"""`python -m data_prep verify DIR`: re-hash, re-count and decode every sample of a converted dataset.

DIR is a local folder or an object-storage URI (`s3://bucket/prefix`; data_prep/storage.py, credentials
and endpoint from the environment): the same checks either way, each shard read once as a stream
(hashed while the tar is parsed), so a bucket's shards are checked where they live, without a copy.

Checks per split: manifest valid and complete; no unlisted .tar files; per shard: file present,
sha256 as recorded, tar readable to the end, sample count as recorded, every sample has a `png` that
decodes to the manifest's resolution and channels, `cls` (if any) an integer in 0..num_classes-1,
keys unique in the split. A split whose conversion never finished is reported as such, with the
command that resumes it. One function per check (`_check_sha256`, `_check_count`, `_check_sample`).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_prep import manifest as mf
from data_prep.storage import RemotePath, as_path, open_binary
from data_prep.writer import CHUNK


@dataclass(frozen=True, kw_only=True)
class Problem:
    split_dir: str
    shard: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = "/".join(x for x in (self.shard, self.key) if x)
        return f"{self.split_dir}: {where + ': ' if where else ''}{self.message}"


def split_dirs(path: Path | RemotePath) -> list[Path | RemotePath]:
    """`path` itself when it looks like a split folder (finished, unfinished or orphaned shards),
    else its subfolders that do."""
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    if _looks_like_split(path):
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_dir() and _looks_like_split(p)), key=str)
    if not found:
        raise ValueError(f"{path}: no {mf.MANIFEST_NAME} here or in its subfolders")
    return found


def _looks_like_split(path: Path | RemotePath) -> bool:
    records = any((path / n).exists() for n in (mf.MANIFEST_NAME, mf.PROGRESS_NAME))
    return records or bool(mf.list_shard_files(path))


def verify_path(path: str | os.PathLike | RemotePath, *, workers: int = 1) -> list[Problem]:
    problems: list[Problem] = []
    for d in split_dirs(as_path(path)):
        problems += verify_split(d, workers=workers)
    return problems


def verify_split(split_dir: Path | RemotePath, *, workers: int = 1) -> list[Problem]:
    sd = str(split_dir)
    try:
        m = mf.read_manifest(split_dir)
    except ValueError as exc:
        return [Problem(split_dir=sd, shard=None, key=None, message=str(exc))]
    problems = []
    listed = {s["name"] for s in m["shards"]}
    for extra in mf.list_shard_files(split_dir):
        if extra.name not in listed:
            problems.append(
                Problem(split_dir=sd, shard=extra.name, key=None, message="not listed in the manifest")
            )
    h, w = m["resolution"]
    classes = _num_classes(m)
    jobs = [(split_dir, s, h, w, m["channels"], classes) for s in m["shards"]]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = pool.starmap(verify_shard, jobs)
    else:
        results = [verify_shard(*j) for j in jobs]
    keys: Counter[str] = Counter()
    for shard_problems, shard_keys in results:
        problems += shard_problems
        keys.update(shard_keys)
    for key, n in sorted(keys.items()):
        if n > 1:
            problems.append(
                Problem(split_dir=sd, shard=None, key=key, message=f"key appears {n} times in the split")
            )
    return problems


def _num_classes(m: dict) -> int | None:
    """How many labels the split's release has (`num_classes`, else the `classes` list), if known."""
    if "num_classes" in m:
        return m["num_classes"]
    classes = m.get("classes")
    return len(classes) if isinstance(classes, list) and classes else None


def verify_shard(
    split_dir: Path | RemotePath, entry: dict, h: int, w: int, channels: int, num_classes: int | None = None
) -> tuple[list[Problem], list[str]]:
    name, sd = entry["name"], str(split_dir)
    path = split_dir / name

    def problem(message: str, key: str | None = None) -> Problem:
        return Problem(split_dir=sd, shard=name, key=key, message=message)

    if not path.is_file():
        return [problem("missing")], []
    with open_binary(path) as raw:
        stream = _HashingReader(raw)
        samples, order, error = _read_samples(stream)
        stream.drain()  # the bytes after the end-of-archive marker count in the sha256 too
    problems = [problem(msg) for msg in _check_sha256(stream.hexdigest(), entry)]
    if error is not None:
        problems.append(problem(f"tar unreadable after {len(order)} samples ({error})"))
    problems += [problem(msg) for msg in _check_count(order, entry)]
    for key in order:
        problems += [problem(msg, key) for msg in _check_sample(samples[key], h, w, channels, num_classes)]
    return problems, order


class _HashingReader:
    """A read-only stream that hashes what passes through it: one read of a shard for both checks."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._sha.update(data)
        return data

    def drain(self) -> None:
        try:
            while self.read(CHUNK):
                pass
        except OSError:
            pass  # a shard that cannot be read to the end fails the sha256 check instead

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _read_samples(stream) -> tuple[dict[str, dict[str, bytes]], list[str], Exception | None]:
    """Parse a tar stream front to back (``r|``: no seeks) into {key: {ext: bytes}}, keys in order,
    and the error that stopped it early, if any."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                key = member.name[: len(member.name) - len(base)] + key
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                f = tar.extractfile(member)
                data = f.read() if f else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                samples[key][ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        return samples, order, exc
    return samples, order, None


def _check_sha256(digest: str, entry: dict) -> list[str]:
    if digest != entry["sha256"]:
        return [f"sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}..."]
    return []


def _check_count(order: list[str], entry: dict) -> list[str]:
    if len(order) != entry["count"]:
        return [f"{len(order)} samples, manifest says {entry['count']}"]
    return []


def _check_sample(
    sample: dict[str, bytes], h: int, w: int, channels: int, num_classes: int | None = None
) -> list[str]:
    out = []
    if "png" not in sample:
        return [f"no png (has {sorted(sample)})"]
    try:
        with Image.open(io.BytesIO(sample["png"])) as img:
            if img.format != "PNG":
                out.append(f"png member is {img.format}, not PNG")
            img.load()
            c = {"RGB": 3, "L": 1}.get(img.mode)
            if c != channels:
                out.append(f"mode {img.mode}, manifest says {channels} channels")
            if (img.height, img.width) != (h, w):
                out.append(f"{img.height}x{img.width}, manifest says {h}x{w}")
    except Exception as exc:  # any decoder failure is a finding, not a crash
        out.append(f"png does not decode ({type(exc).__name__}: {exc})")
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            out.append(f"cls {sample['cls'][:20]!r} is not an integer")
        else:
            if num_classes is not None and not 0 <= label < num_classes:
                out.append(f"cls {label} outside 0..{num_classes - 1} (manifest num_classes {num_classes})")
    return out


def print_report(path: Path | str, problems: list[Problem], stream=None) -> None:
    stream = stream or sys.stdout  # looked up per call: tests and tools swap sys.stdout
    if not problems:
        print(f"{path}: OK", file=stream)
        return
    for p in problems:
        print(p, file=stream)
    print(f"{path}: {len(problems)} problem(s)", file=stream)
