"""manifest.json and the partial-progress record: names, atomic writes, validation, compatibility.

A split directory `OUT/{split}/` holds `{split}-{i:06d}.tar` shards, `manifest.json` (written last,
only when every shard is done) and, while a conversion is under way or was interrupted,
`progress.json` (the shards finished so far). Only a manifest with `"complete": true` makes a split
usable; readers must never trust `*.tar` files without it.

Standard library only: the loader imports this module too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    """Parse a JSON object; ValueError naming the file when it is missing, unreadable or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
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

    Raises ValueError naming the file when it is missing, not JSON, lacks a required key, is not
    marked complete, or its shard list does not add up.
    """
    path = Path(split_dir) / MANIFEST_NAME
    m = load_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if m["complete"] is not True:
        raise ValueError(f"{path}: conversion not complete (re-run the converter to finish it)")
    shards = m["shards"]
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{path}: 'shards' must be a non-empty list")
    for s in shards:
        if not isinstance(s, dict) or not {"name", "count", "sha256"} <= s.keys():
            raise ValueError(f"{path}: malformed shard entry {s!r}")
        if "/" in s["name"] or s["name"].startswith("."):
            raise ValueError(f"{path}: shard name {s['name']!r} must be a plain file name")
    if sum(s["count"] for s in shards) != m["total"]:
        raise ValueError(
            f"{path}: shard counts sum to {sum(s['count'] for s in shards)}, total says {m['total']}"
        )
    res = m["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)):
        raise ValueError(f"{path}: 'resolution' must be [H, W], got {res!r}")
    return m


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
    return sorted(p for p in split_dir.glob("*.tar") if p.is_file())


def remove_temporaries(split_dir: Path) -> None:
    """Delete leftovers of an interrupted run (never complete, so never worth keeping)."""
    for p in split_dir.glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
