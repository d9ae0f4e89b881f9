"""What data_prep may delete or overwrite: only files that a record of its own names.

A split folder can hold more than our shards: a user's own `.tar` files, shards of a conversion
whose manifest was lost, notes. A glob for `*.tar` cannot tell them apart, so deletion goes by
name: a shard file is ours when `manifest.json` lists it or `progress.json` lists it as finished or
planned (the progress record names every shard of a conversion before the first one is written,
so a shard renamed into place just before a crash is still named). Anything else is left alone,
and a conversion refuses to write next to `.tar` files nobody recorded rather than mix with them.

Ownership must be provable, not inferred from a file name: a `manifest.json` beside `--output`
may be a web app's, another tool's WebDataset index, or a split folder may be a symlink to a
dataset elsewhere. So every record data_prep writes (manifest, progress, lock) carries a signature
`{"format": "eiw-data-prep/<kind>", "version": 1, "output_id": <id>}`, where the id is the random
one in `OUTPUT/.data_prep.json`, written when data_prep first writes into that output. A record is
ours only when its signature names this output's id and it lies inside `--output` once symlinks are
resolved; deletion and overwrite go through `require_ours` and refuse anything else, naming it.

Standard library only, like manifest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
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
FORMAT = "eiw-data-prep"
VERSION = 1
SIGNATURE_KEY = "data_prep"
OUTPUT_RECORD = ".data_prep.json"  # the output's own id, which every record of ours repeats


def signature(kind: str, output_id: str) -> dict:
    """The signature a record of `kind` (manifest, progress, lock, output) carries."""
    return {"format": f"{FORMAT}/{kind}", "version": VERSION, "output_id": output_id}


def output_id(output: Path, *, create: bool = True) -> str | None:
    """The id of the output folder `output` (created, race-free, on first use when `create`).

    ValueError naming the file when `.data_prep.json` exists but is not ours."""
    path = Path(output) / OUTPUT_RECORD
    if not path.exists():
        if not create:
            return None
        oid = uuid.uuid4().hex
        tmp = path.with_name(f"{mf.TMP_PREFIX}{OUTPUT_RECORD}.{os.getpid()}")
        tmp.write_text(json.dumps({SIGNATURE_KEY: signature("output", oid)}) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent builder's id wins, whole
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    record = mf.load_json(path)
    sig = record.get(SIGNATURE_KEY)
    if not (
        isinstance(sig, dict)
        and sig.get("format") == f"{FORMAT}/output"
        and sig.get("version") == VERSION
        and isinstance(sig.get("output_id"), str)
    ):
        raise ValueError(f"{path}: not a data_prep output record; choose another --output")
    return sig["output_id"]


def require_inside(split_dir: Path, output: Path) -> None:
    """ValueError unless `split_dir` is `output/<name>` after resolving symlinks."""
    real, root = Path(split_dir).resolve(), Path(output).resolve()
    if real.parent != root:
        raise ValueError(
            f"{split_dir} resolves to {real}, outside --output {root}; data_prep writes and deletes only "
            "inside --output: remove the link, or give its target as --output"
        )


def require_ours(split_dir: Path, output: Path) -> None:
    """ValueError naming the record unless every record in `split_dir` is provably ours.

    Called before anything in `split_dir` is deleted or overwritten."""
    require_inside(split_dir, output)
    oid = output_id(output, create=False)
    for record_name in (mf.MANIFEST_NAME, mf.PROGRESS_NAME):
        path = Path(split_dir) / record_name
        if not path.exists():
            continue
        sig = mf.load_json(path).get(SIGNATURE_KEY)
        if not isinstance(sig, dict) or not str(sig.get("format", "")).startswith(f"{FORMAT}/"):
            raise ValueError(
                f"{path}: carries no data_prep signature, so data_prep cannot prove it wrote the files "
                "it names (another tool's record, or one written before data_prep signed its records) "
                f"and deletes or overwrites nothing it names: choose another --output, or move "
                f"{split_dir} away yourself (a complete older conversion still reads and verifies: "
                f"`python -m data_prep verify {split_dir}`)"
            )
        if sig.get("version") != VERSION:
            raise ValueError(
                f"{path}: data_prep signature version {sig.get('version')!r}, this data_prep writes "
                f"{VERSION}; it will not delete what another version recorded: choose another --output"
            )
        if oid is None or sig.get("output_id") != oid:
            raise ValueError(
                f"{path}: signed for another data_prep output (output_id {sig.get('output_id')!r}, "
                f"{Path(output) / OUTPUT_RECORD} says {oid!r}), e.g. a split copied or linked in from "
                "elsewhere; data_prep will not delete it: move it away or choose another --output"
            )


@contextlib.contextmanager
def locked(path: Path, output_id: str):
    """An exclusive flock on `path`; the lock file carries our signature (written once, when empty)."""
    with open(path, "a+") as f:  # "a": never truncates another builder's lock
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if f.tell() == 0:
                f.write(json.dumps({SIGNATURE_KEY: signature("lock", output_id)}) + "\n")
                f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    ours = recorded_shards(split_dir) | {mf.MANIFEST_NAME, mf.PROGRESS_NAME, LOCK_NAME, OUTPUT_RECORD}
    return sorted(
        p.name
        for p in Path(split_dir).iterdir()
        if p.name not in ours and not (p.is_file() and TEMPORARY_NAME.match(p.name))
    )


def remove_recorded(split_dir: Path, output: Path) -> None:
    """Delete the shards the split's records name, then the records themselves; nothing else.

    Only when the records are provably ours (`require_ours`); otherwise ValueError naming them."""
    require_ours(split_dir, output)
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
