"""Local paths and object-storage URIs (``s3://bucket/prefix``, ``gs://``, ``memory://`` ... anything
fsspec handles) behind one small path type, for shards, manifests and checkpoints.

``as_path("runs")`` is a ``pathlib.Path``; ``as_path("s3://bucket/runs")`` a ``RemotePath`` with the
part of Path's interface this project uses (``/``, ``name``, ``parent``, ``exists``, ``is_dir``,
``is_file``, ``iterdir``, ``open``, ``read_bytes``, ``write_bytes``, ``touch``, ``unlink``...).

Credentials and endpoints come from the environment, as for every AWS client: s3fs (botocore) reads
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (an S3-protocol server that is not AWS: MinIO, Ceph,
moto), ``~/.aws/config`` and instance roles. Ray Train's storage (pyarrow) reads the same variables.

Object stores have no rename and no directories: an object appears whole when its upload completes
(single PUT or multipart completion) or not at all. Writers here therefore make one object the
commit point of a group (a checkpoint's ``state.pt``, a split's ``manifest.json``), written last.
Listings are never served from fsspec's cache: other processes (Ray's uploader, other workers) write
the same prefixes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")


def is_uri(path: str | os.PathLike | RemotePath) -> bool:
    """Whether ``path`` names object storage (``scheme://...``; ``file://`` counts as local)."""
    if isinstance(path, RemotePath):
        return True
    m = _SCHEME.match(str(path)) if isinstance(path, str) else None
    return m is not None and m["scheme"].lower() != "file"


def as_path(path: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A ``Path`` for a local path (``file://`` stripped), a ``RemotePath`` for an object-store URI."""
    if isinstance(path, RemotePath | Path):
        return path
    text = os.fspath(path)
    if is_uri(text):
        return RemotePath(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


def _filesystem(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


class RemotePath:
    """An object-store location ``scheme://bucket/key`` with a pathlib-like interface (module doc).

    Directories are key prefixes: ``mkdir`` does nothing, ``is_dir`` is true when an object lies under
    the prefix.
    """

    def __init__(self, uri: str) -> None:
        m = _SCHEME.match(uri)
        if m is None:
            raise ValueError(f"not an object-storage URI: {uri!r}")
        self.scheme = m["scheme"]
        self.key = uri[m.end() :].strip("/")
        if not self.key:
            raise ValueError(f"{uri!r}: name a bucket (scheme://bucket/prefix)")

    # ------------------------------------------------------------------------------- naming
    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        part = os.fspath(part).strip("/")
        return RemotePath(f"{self.uri}/{part}") if part else self

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return RemotePath(f"{self.scheme}://{head}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    # ------------------------------------------------------------------------------ queries
    @property
    def fs(self):
        return _filesystem(self.uri)[0]

    @property
    def fs_path(self) -> str:
        """The path as the filesystem object names it (``bucket/key`` for s3)."""
        return _filesystem(self.uri)[1]

    def _fresh(self):
        fs, path = _filesystem(self.uri)
        fs.invalidate_cache()  # others write these prefixes (module doc)
        return fs, path

    def exists(self) -> bool:
        fs, path = self._fresh()
        return fs.exists(path)

    def is_file(self) -> bool:
        fs, path = self._fresh()
        return fs.isfile(path)

    def is_dir(self) -> bool:
        fs, path = self._fresh()
        return fs.isdir(path)

    def is_symlink(self) -> bool:
        return False

    def size(self) -> int:
        fs, path = self._fresh()
        return int(fs.size(path))

    def iterdir(self) -> Iterator[RemotePath]:
        fs, path = self._fresh()
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return iter(())
        base = path.rstrip("/")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return iter([self / n for n in sorted(names)])

    # ------------------------------------------------------------------------------ reading
    def open(self, mode: str = "rb", **kwargs: Any):
        fs, path = _filesystem(self.uri)
        return fs.open(path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # ------------------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> int:
        """One object, visible whole once the upload completes."""
        fs, path = _filesystem(self.uri)
        fs.pipe_file(path, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def touch(self, exist_ok: bool = True) -> None:
        if not self.exists():
            self.write_bytes(b"")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories; a prefix exists once an object lies under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = _filesystem(self.uri)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def upload_from(self, local: str | os.PathLike) -> None:
        """Copy the local file ``local`` to this object (multipart for large files; atomic)."""
        fs, path = _filesystem(self.uri)
        fs.put_file(os.fspath(local), path)

    def download_to(self, local: str | os.PathLike) -> None:
        fs, path = _filesystem(self.uri)
        fs.get_file(path, os.fspath(local))

    def rmtree(self) -> None:
        """Remove every object under this prefix."""
        fs, path = self._fresh()
        if fs.exists(path):
            fs.rm(path, recursive=True)


def open_binary(path: str | os.PathLike | RemotePath, *, block_size: int = 8 << 20):
    """Open a local file or an object for streaming reads (object stores: ``block_size`` read-ahead
    ranges, so a shard streams without a local copy)."""
    p = as_path(path)
    if isinstance(p, RemotePath):
        return p.open("rb", block_size=block_size, cache_type="readahead")
    return open(p, "rb", buffering=1 << 20)


def join(root: str | os.PathLike | RemotePath, *parts: str) -> str:
    """``root/part/...`` as a string (a URI stays a URI)."""
    p = as_path(root)
    for part in parts:
        p = p / part
    return str(p)
