"""Copy finished shards to object storage and check them there: ``python -m data_prep upload DIR URI``
(``python -m data_prep <source> --output s3://...`` converts into a local staging folder, then does
the same).

Per split: the local manifest must be complete and each local shard must hash to its manifest
sha256 before anything is copied. The destination's old ``manifest.json`` is deleted first (from then
on the split does not look usable to any reader), each shard is uploaded (one object each: it
appears whole or not at all) and read back to compare its size and sha256 with the manifest, and the
manifest is uploaded last: only a split whose every shard checked out gets one. A shard already
there with the manifest's size and sha256 is not copied again, so an interrupted upload resumes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from data_prep import manifest as mf
from data_prep.storage import RemotePath, as_path
from data_prep.writer import CHUNK, sha256_file


def _remote_sha256(obj: RemotePath) -> str:
    h = hashlib.sha256()
    with obj.open("rb", block_size=8 << 20) as f:
        while block := f.read(CHUNK * 8):
            h.update(block)
    return h.hexdigest()


def _matches(obj: RemotePath, size: int, sha256: str, *, verify: bool) -> bool:
    try:
        if obj.size() != size:
            return False
    except FileNotFoundError:
        return False
    return not verify or _remote_sha256(obj) == sha256


def upload_split(local: str | os.PathLike, dest: str | RemotePath, *, verify: bool = True,
                 progress: bool = False) -> dict:  # fmt: skip
    """Upload the finished split ``local`` to ``dest`` (module doc); returns its manifest.

    ValueError when the local split is unfinished or a local shard does not match its manifest, or
    when an uploaded object does not read back as it should (``verify``: by sha256, else by size).
    """
    local = Path(local)
    dest = as_path(dest)
    if not isinstance(dest, RemotePath):
        raise ValueError(f"{dest}: not an object-storage URI (scheme://bucket/prefix)")
    manifest = mf.read_manifest(local)
    for s in manifest["shards"]:
        if sha256_file(local / s["name"]) != s["sha256"]:
            raise ValueError(f"{local / s['name']}: sha256 differs from {mf.MANIFEST_NAME}; run verify")
    (dest / mf.MANIFEST_NAME).unlink(missing_ok=True)
    for i, s in enumerate(manifest["shards"]):
        src, obj = local / s["name"], dest / s["name"]
        size = src.stat().st_size
        if _matches(obj, size, s["sha256"], verify=verify):
            continue
        obj.upload_from(src)
        if not _matches(obj, size, s["sha256"], verify=verify):
            raise ValueError(f"{obj}: does not read back as uploaded from {src} (size or sha256 differ)")
        if progress:
            print(f"{obj}: uploaded ({i + 1}/{len(manifest['shards'])})", file=sys.stderr)
    (dest / mf.MANIFEST_NAME).upload_from(local / mf.MANIFEST_NAME)  # last: the split is usable now
    return manifest


def upload_dataset(local: str | os.PathLike, dest: str | RemotePath, *, verify: bool = True,
                   progress: bool = False) -> list[str]:  # fmt: skip
    """Upload every finished split under ``local`` (``local`` itself when it is a split folder) to
    ``dest/<split>``; returns the destination URIs."""
    from data_prep.verify import split_dirs

    local = Path(local)
    dest = as_path(dest)
    done = []
    for split in split_dirs(local):
        target = dest if split == local else dest / split.name
        upload_split(split, target, verify=verify, progress=progress)
        done.append(str(target))
    return done
