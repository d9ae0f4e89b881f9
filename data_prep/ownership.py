"""What data_prep may delete or overwrite: only files that a record of its own names.

A split folder can hold more than our shards: a user's own `.tar` files, shards of a conversion
whose manifest was lost, notes. A glob for `*.tar` cannot tell them apart, so deletion goes by
name: a shard file is ours when `manifest.json` lists it or `progress.json` lists it as finished or
planned (the progress record names every shard of a conversion before the first one is written,
so a shard renamed into place just before a crash is still named). Anything else is left alone,
and a conversion refuses to write next to `.tar` files nobody recorded rather than mix with them.

Standard library only, like manifest.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep import manifest as mf

LOCK_NAME = ".lock"
# The only names data_prep gives shards (`{split}-{i:06d}.tar`) and temporaries
# (`.tmp-{final name}.{pid}`): a record naming anything else is not trusted to delete it.
SHARD_NAME = re.compile(r"^[a-z]+-\d{6}\.tar$")
TEMPORARY_NAME = re.compile(
    rf"^{re.escape(mf.TMP_PREFIX)}(?:[a-z]+-\d{{6}}\.tar|{re.escape(mf.MANIFEST_NAME)}|"
    rf"{re.escape(mf.PROGRESS_NAME)})\.\d+$"
)
SHOWN = 5  # file names listed in an error before "and N more"


def recorded_shards(split_dir: Path) -> set[str]:
    """Shard names the split's manifest and progress record name (finished or planned).

    ValueError naming the record when it is unreadable or names something that is not a shard
    file name data_prep writes (a record must never steer a deletion outside our own shards).
    """
    names: set[str] = set()
    for record_name in (mf.MANIFEST_NAME, mf.PROGRESS_NAME):
        path = Path(split_dir) / record_name
        if not path.exists():
            continue
        record = mf.load_json(path)
        shards = record.get("shards", [])
        planned = record.get("planned", [])
        if not isinstance(shards, list) or not isinstance(planned, list):
            raise ValueError(f"{path}: 'shards' and 'planned' must be lists")
        listed = [s.get("name") if isinstance(s, dict) else s for s in shards] + planned
        for name in listed:
            if not isinstance(name, str) or not SHARD_NAME.match(name):
                raise ValueError(f"{path}: {name!r} is not a shard name data_prep writes")
        names.update(listed)
    return names


def unrecorded_shards(split_dir: Path) -> list[str]:
    """Names of `.tar` files in the split folder that no record of ours names."""
    recorded = recorded_shards(split_dir)
    return [p.name for p in mf.list_shard_files(Path(split_dir)) if p.name not in recorded]


def refuse_unrecorded_shards(split_dir: Path) -> None:
    """ValueError naming the folder and the files when it holds `.tar` files no record names."""
    foreign = unrecorded_shards(split_dir)
    if foreign:
        raise ValueError(
            f"{split_dir} holds .tar files that no {mf.MANIFEST_NAME} or {mf.PROGRESS_NAME} of "
            f"data_prep names ({name_list(foreign)}); data_prep deletes and overwrites only files "
            "its own records name, so it will not write next to them (not even with --overwrite): "
            "choose another --output, or move those files away (if they are shards of a conversion "
            "whose manifest was lost, delete them yourself and convert again)"
        )


def foreign_entries(split_dir: Path) -> list[str]:
    """Everything in the split folder that data_prep did not put there (files and folders)."""
    ours = recorded_shards(split_dir) | {mf.MANIFEST_NAME, mf.PROGRESS_NAME, LOCK_NAME}
    return sorted(
        p.name
        for p in Path(split_dir).iterdir()
        if p.name not in ours and not (p.is_file() and TEMPORARY_NAME.match(p.name))
    )


def remove_recorded(split_dir: Path) -> None:
    """Delete the shards the split's records name, then the records themselves; nothing else."""
    for name in sorted(recorded_shards(split_dir)):
        (Path(split_dir) / name).unlink(missing_ok=True)
    for record_name in (mf.MANIFEST_NAME, mf.PROGRESS_NAME):
        (Path(split_dir) / record_name).unlink(missing_ok=True)


def remove_temporaries(split_dir: Path) -> None:
    """Delete our own leftovers of an interrupted run (never complete, so never worth keeping)."""
    for p in Path(split_dir).iterdir():
        if TEMPORARY_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def name_list(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
