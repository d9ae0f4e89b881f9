"""Writing one shard: a deterministic tar under a temporary name, hashed while written, renamed when done.

The tar layout is exactly what webdataset's TarWriter writes (USTAR, one member `{key}.{ext}` per
field, extensions in sorted order), produced with `tarfile` directly: importing webdataset pulls in
torch (~2 s per worker process), which the converters do not otherwise need.
Determinism: fixed mtime, uid/gid 0, empty user/group names, fixed mode; members in sample order.
Together with deterministic PNG encoding the same samples give byte-identical shards on every run
and with any number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.manifest import TMP_PREFIX

FIXED_MTIME = 0
CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One converted image: `key` has no dots or slashes (webdataset splits names at the first dot)."""

    key: str
    png: bytes
    label: int | None = None


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A source position whose bytes could not be decoded; only the LSUN converter produces these."""

    key: str
    reason: str


@dataclass(kw_only=True)
class ShardRecord:
    index: int
    name: str
    count: int
    sha256: str
    skipped: list[str] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        entry: dict = {"name": self.name, "count": self.count, "sha256": self.sha256}
        if self.skipped:
            entry["skipped"] = list(self.skipped)
        return entry


class _HashingFile:
    """A write-only file wrapper that feeds every byte to sha256 as it goes out."""

    def __init__(self, raw):
        self.raw = raw
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.raw.tell()


class ShardFile:
    """Open `final_path`'s temporary sibling, add samples, `finish()` renames it into place.

    If the process dies before `finish`, only a `.tmp-*` file remains; the next run deletes it.
    """

    def __init__(self, final_path: Path, *, index: int):
        self.final_path = Path(final_path)
        self.index = index
        self.tmp_path = self.final_path.with_name(f"{TMP_PREFIX}{self.final_path.name}.{os.getpid()}")
        self._raw = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.skipped: list[str] = []
        self._keys: set[str] = set()

    def add(self, sample: Sample) -> None:
        with naming_os_errors(self.final_path):
            self._add(sample)

    def _add(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r} in {self.final_path.name}")
        assert "." not in sample.key and "/" not in sample.key, sample.key
        self._keys.add(sample.key)
        fields = {"png": sample.png}
        if sample.label is not None:
            fields["cls"] = str(int(sample.label)).encode("ascii")
        for ext in sorted(fields):
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mtime, info.mode = len(fields[ext]), FIXED_MTIME, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(fields[ext]))
        self.count += 1

    def skip(self, item: Skipped) -> None:
        self.skipped.append(item.key)

    def finish(self) -> ShardRecord:
        with naming_os_errors(self.final_path):
            self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp_path, self.final_path)
        return ShardRecord(
            index=self.index,
            name=self.final_path.name,
            count=self.count,
            sha256=self._hashing.hash.hexdigest(),
            skipped=self.skipped,
        )

    def abort(self) -> None:
        try:
            # Close the tar stream first, or its finaliser later writes into the closed file.
            with contextlib.suppress(Exception):
                self._tar.close()
            self._raw.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_os_errors(path: Path):
    """Give an OSError that names no file (a write() on a full disk does not) the file it was about,
    so the one-line error a user sees says where the disk filled up."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()
