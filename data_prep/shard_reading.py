"""Reading one of our shards: a USTAR stream parser, and the same checked against the manifest's sha256.

`tar_samples` replaces `wds.tarfile_to_samples()` for data_prep's own shards (see `_read_tar`).
`VerifiedTarSamples` hashes every byte of a shard as it streams and compares the digest with the
manifest's at the shard's end (data_prep/loading.py's module doc: fail or skip, and the cost).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from collections.abc import Iterator

from data_prep.storage import open_binary

log = logging.getLogger(__name__)
ON_CORRUPT = ("fail", "skip")
# Shards dropped by on_corrupt="skip" in this process (a loader worker counts its own): url -> times.
CORRUPT_SHARDS: collections.Counter[str] = collections.Counter()


class CorruptShardError(ValueError):
    """A shard whose bytes do not hash to the sha256 its manifest records."""


class _HashingReader:
    """Read-only wrapper that hashes every byte read; forward seeks are reads (so nothing is skipped)."""

    def __init__(self, raw):
        self.raw, self.hash = raw, hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def skip(self, n: int) -> None:
        self.read(n)

    def finish(self) -> str:
        """The sha256 of the whole file (reads what the tar parser left unread: end blocks, padding)."""
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


# Local shards this process has hashed and found intact, by (path, sha256, inode, size, mtime):
# resampling reads a shard many times in a run, and re-hashing an unchanged file finds nothing new.
# Loader workers start each epoch, so they re-check every epoch; a shard replaced or rewritten
# (new inode, size or mtime) is hashed again. Object-storage shards are hashed on every read.
_VERIFIED: set[tuple] = set()


def _local_identity(url: str, digest: str) -> tuple | None:
    if "://" in url:
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None  # open_binary names the problem
    return (url, digest, st.st_ino, st.st_size, st.st_mtime_ns)


class VerifiedTarSamples:
    """Pipeline stage like `_tar_samples`, checking each shard's sha256 against `digests`.

    fail: samples stream as read and the shard's end raises CorruptShardError on a mismatch (the
    run stops before the next step completes). skip: a shard's samples are held until it checks."""

    def __init__(self, digests: dict[str, str], on_corrupt: str = "fail"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt_shard: must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.digests, self.on_corrupt = digests, on_corrupt

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        skipped_in_row = 0
        for item in src:
            url = item["url"]
            expected = self.digests[url]
            identity = _local_identity(url, expected)
            if identity is not None and identity in _VERIFIED:
                with open_binary(url) as raw:  # checked in this process and unchanged since
                    yield from _read_tar(_Seeking(raw), url)
                skipped_in_row = 0
                continue
            with open_binary(url) as raw:
                f = _HashingReader(raw)
                samples = _read_tar(f, url)
                if self.on_corrupt == "fail":
                    yield from samples
                    held = []
                else:
                    held = list(samples)
                actual = f.finish()
            if actual == expected:
                skipped_in_row = 0
                if identity is not None:
                    _VERIFIED.add(identity)
                yield from held
                continue
            message = (
                f"{url}: corrupt shard (sha256 {actual[:12]}..., its manifest says {expected[:12]}...); "
                "re-copy it, or run `python -m data_prep verify` on the split"
            )
            if self.on_corrupt == "fail":
                raise CorruptShardError(message + "; data.on_corrupt_shard=skip trains on without it")
            CORRUPT_SHARDS[url] += 1
            log.warning("%s; skipped (data.on_corrupt_shard=skip)", message)
            skipped_in_row += 1
            if skipped_in_row > 2 * len(self.digests):
                raise CorruptShardError(f"{message}; every shard read in a row was corrupt")


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0")


def tar_samples(src: Iterator[dict]) -> Iterator[dict]:
    """Pipeline stage: {"url": path} -> samples {"__key__", "__url__", ext: bytes, ...}.

    Replaces `wds.tarfile_to_samples()` for our own shards: it parses the 512-byte USTAR headers
    directly instead of going through `tarfile`'s stream mode, which cost about as much per sample
    as decoding a 64x64 PNG. Same grouping rule as webdataset (key = name up to the first dot of
    the basename; consecutive members with one key form a sample). Long-name (pax/GNU) members,
    which data_prep never writes, are rejected rather than misread.
    """
    for item in src:
        url = item["url"]
        with open_binary(url) as f:
            yield from _read_tar(_Seeking(f), url)


class _Seeking:
    """`skip(n)` as a relative seek (unverified reads need not read the padding)."""

    def __init__(self, raw):
        self.read = raw.read
        self.raw = raw

    def skip(self, n: int) -> None:
        self.raw.seek(n, os.SEEK_CUR)


def _read_tar(f, url: str) -> Iterator[dict]:
    """The samples of one shard; `f` has `read(n)` and `skip(n)`."""
    sample: dict | None = None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            break
        try:
            name = header[:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptShardError(f"{url}: corrupt tar header ({exc})") from None
        kind = header[156:157]
        data = f.read(size)
        f.skip(-size % _BLOCK)
        if len(data) != size:
            raise ValueError(f"{url}: truncated tar member {name!r}")
        if kind not in _FILE_TYPES:
            if kind == b"5":
                continue
            raise ValueError(f"{url}: unsupported tar member type {kind!r} for {name!r}")
        full = f"{prefix}/{name}" if prefix else name
        slash = full.rfind("/") + 1
        dot = full.find(".", slash)
        if dot < 0:
            continue
        key, ext = full[:dot], full[dot + 1 :]
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[ext] = data
    if sample is not None:
        yield sample
