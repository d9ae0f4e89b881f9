"""manifest.json and the partial-progress record: names, atomic writes, validation, compatibility.

A split directory `OUT/{split}/` holds `{split}-{i:06d}.tar` shards, `manifest.json` (written last,
only when every shard is done) and, while a conversion is under way or was interrupted,
`progress.json` (the shards finished so far). Only a manifest with `"complete": true` makes a split
usable; readers must never trust `*.tar` files without it.

Standard library only (fsspec, lazily, for object-storage URIs): the loader imports this module too.
`read_manifest` and `load_json` take local paths and URIs (`s3://bucket/prefix/train`) alike.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from data_prep.storage import as_path

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
TMP_PREFIX = ".tmp-"
REQUIRED_KEYS = (
    "source",
    "split",
    "resolution",
    "channels",
    "n_bits",
    "sample_format",
    "shards",
    "total",
    "complete",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # a full disk names no file


def load_json(path: Path) -> dict:
    """Parse a JSON object; ValueError naming the file when it is missing, unreadable or not an object."""
    try:
        text = as_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """Load and validate `split_dir/manifest.json` of a finished conversion.

    Raises ValueError naming the file and key when it is missing (saying so, with the command to
    resume, when `progress.json` shows an unfinished conversion), not JSON, lacks a required key,
    holds a value of the wrong type, is not marked complete, or its shard list does not add up.
    """
    split = as_path(split_dir)
    path = split / MANIFEST_NAME
    if not path.exists() and (split / PROGRESS_NAME).exists():
        raise ValueError(unfinished_conversion(split))
    m = load_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if m["complete"] is not True:
        raise ValueError(f"{path}: conversion not complete (re-run the converter to finish it)")
    shards = m["shards"]
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{path}: 'shards' must be a non-empty list")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not {"name", "count", "sha256"} <= s.keys():
            raise ValueError(f"{path}: shards[{i}] must have name, count and sha256, got {_short(s)}")
        name = s["name"]
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{path}: shards[{i}].name {_short(name)} must be a plain file name")
        _require_count(path, f"shards[{i}].count", s["count"])
        if not (isinstance(s["sha256"], str) and _SHA256.fullmatch(s["sha256"])):
            raise ValueError(f"{path}: shards[{i}].sha256 must be 64 hex digits, got {_short(s['sha256'])}")
    _require_count(path, "total", m["total"])
    if sum(s["count"] for s in shards) != m["total"]:
        raise ValueError(
            f"{path}: shard counts sum to {sum(s['count'] for s in shards)}, total says {m['total']}"
        )
    res = m["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(_is_int(v) and v > 0 for v in res)):
        raise ValueError(f"{path}: 'resolution' must be [H, W], got {_short(res)}")
    if not (_is_int(m["channels"]) and m["channels"] in (1, 3)):
        raise ValueError(f"{path}: 'channels' must be 1 or 3, got {_short(m['channels'])}")
    if "num_classes" in m and not (_is_int(m["num_classes"]) and m["num_classes"] > 0):
        raise ValueError(f"{path}: 'num_classes' must be a positive integer, got {_short(m['num_classes'])}")
    return m


def unfinished_conversion(split_dir: Path) -> str:
    """What to tell someone who points a reader at a split whose conversion never finished."""
    progress = split_dir / PROGRESS_NAME
    record = load_json(progress)
    shards, planned = record.get("shards"), record.get("planned")
    done = (
        f"{len(shards)} of {len(planned)}"
        if isinstance(shards, list) and isinstance(planned, list)
        else "some"
    )
    command = record.get("command")
    how = (
        f"re-run `{shlex.join(command)}` to resume it"
        if isinstance(command, list) and command and all(isinstance(c, str) for c in command)
        else "re-run the same data_prep command to resume it"
    )
    return (
        f"{split_dir}: unfinished conversion ({PROGRESS_NAME} records {done} shards done, no "
        f"{MANIFEST_NAME} yet); {how}: finished shards are kept"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_count(path: Path, key: str, value: Any) -> None:
    # JSON strings and floats compare and add up wrongly later; say which key is off, here.
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"{path}: {key} must be a non-negative integer, got {_short(value)}")


def recorded_dataset(record: dict) -> dict | None:
    """The `config.dataset` of a manifest or progress record (what makes two outputs the same
    dataset), or None when the record has none."""
    config = record.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset if isinstance(dataset, dict) else None


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable list of the config fields that differ (empty when the configs match)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: existing {_short(old.get(key))} vs requested {_short(new.get(key))}")
    return diffs


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_shard_files(split_dir: Path) -> list[Path]:
    """The ``*.tar`` files in ``split_dir`` (a ``Path`` or a ``data_prep.storage.RemotePath``)."""
    return sorted((p for p in split_dir.iterdir() if p.name.endswith(".tar") and p.is_file()), key=str)
