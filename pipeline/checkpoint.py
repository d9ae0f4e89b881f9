"""Training checkpoints: one directory holding ``state.pt`` (everything needed to resume) and
``config.yaml`` (the resolved config, for people).

Writes are atomic at two levels: each file is written to a temporary sibling, fsynced and renamed,
and ``LocalCheckpoints.commit`` renames a complete temporary directory into place, so a crash leaves
either the previous checkpoint or the new one, never a half-written one. Under Ray Train the
directory is handed to ``ray.train.report``, which registers it only once it is fully persisted.

``state.pt`` holds plain containers of tensors and numbers (loadable with ``weights_only=True``):
step, epoch, model/optimizer/scheduler state dicts, per-rank RNG states, the config as a dict, the
MLflow run id and the non-finite-step counter.

Recovery: ``read_newest_intact`` walks a run's checkpoints newest first and skips (and reports) any
whose ``state.pt`` is missing, empty, truncated or otherwise unreadable. Staging directories carry
their writer's host and pid in their name (``.tmp-checkpoint_<step>.<host>.<pid>``), so the next
writer or resume removes those of writers that are gone (``dead_staging``); nothing else is touched.

Object storage (``run.root: s3://bucket/prefix``; data_prep/storage.py): there is no rename, but an
object appears whole or not at all. ``ObjectCheckpoints`` stages a checkpoint in a local temporary
directory, uploads its other files first and ``state.pt`` last: ``state.pt`` is the commit point
(``list_checkpoints`` only counts directories holding one), so a writer killed mid-upload leaves no
checkpoint that looks complete. Retention deletes ``state.pt`` first for the same reason.

Off the critical path: the background writer is pipeline/checkpoint_writer.py; the RNG states that
``state.pt`` carries are pipeline/rng.py's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_prep.storage import RemotePath, as_path
from pipeline.checkpoint_digest import DIGEST_FILE, digest_problem, write_digest

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
PREFIX = "checkpoint_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
# What a resume reads from state.pt; a file that unpickles but lacks one of these is not intact.
RESUME_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "config", "mlflow_run_id", "skipped_steps",
               "test_bits_per_dim")  # fmt: skip
# Our checkpoint names: checkpoint_<step>, or checkpoint_<step>-<n> when Ray Train already holds the
# plain name (a step re-reached after falling back past an unreadable checkpoint; ray_adapter.py).
CHECKPOINT_NAME = re.compile(r"^checkpoint_(?P<step>[0-9]+)(?:-(?P<again>[0-9]+))?$")
# Our staging names: .tmp-[old-]<checkpoint name>.<host>.<pid>; before hosts were named, .<pid> only.
STAGING_NAME = re.compile(
    r"^\.tmp-(?P<old>old-)?(?P<name>checkpoint_[0-9]+(?:-[0-9]+)?)\.(?:(?P<host>[A-Za-z0-9_.-]+)\.)?(?P<pid>[0-9]+)$"
)
# A staging directory nothing was written into for this long has no live writer, whatever its pid says
# (a reused pid, or a writer on another host sharing the folder, whose pid cannot be checked from here).
STALE_AFTER_S = 24 * 3600


class CorruptCheckpointError(ValueError):
    """A checkpoint directory whose ``state.pt`` is missing, empty, truncated or not a checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def checkpoint_order(name: str) -> tuple[int, int]:
    """Sort key of a checkpoint name: (step, n) for ``checkpoint_<step>[-n]``."""
    m = CHECKPOINT_NAME.match(name)
    assert m is not None, name
    return int(m["step"]), int(m["again"] or 0)


def list_checkpoints(directory: str | os.PathLike | RemotePath) -> list[Path]:
    """The run's checkpoint directories (ours by name, holding a ``state.pt``), oldest first.

    ``directory`` may be an object-storage URI; then the entries are ``RemotePath``s."""
    d = as_path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_order(p.name))


def writer_id() -> str:
    """``<host>.<pid>``: who is writing a staging directory (its name ends with this)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"
    return f"{host}.{os.getpid()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: str | os.PathLike, state: dict[str, Any], config_yaml: str) -> Path:
    """Write ``state`` and the config into ``directory`` (created if needed); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT_VERSION, **state}
    _write_atomic(d / STATE_FILE, lambda f: torch.save(state, f))
    _write_atomic(d / CONFIG_FILE, lambda f: f.write(config_yaml.encode("utf-8")))
    write_digest(d, STATE_FILE)  # last: checkpoint_digest.py
    _fsync_dir(d)
    return d


def read_checkpoint(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """The state dict written by ``write_checkpoint``.

    ``CorruptCheckpointError`` (a ValueError naming the file) when there is no readable ``state.pt``;
    a plain ValueError for a checkpoint of another format version. ``mmap``: map the tensors instead of
    reading them (enough to look at the config).
    """
    path = as_path(directory) / STATE_FILE
    if not path.is_file():
        raise CorruptCheckpointError(f"{directory}: not a checkpoint (no {STATE_FILE})")
    size = -1
    try:
        if isinstance(path, RemotePath):
            return _read_remote(path, map_location=map_location)
        size = path.stat().st_size
        if size == 0:
            raise CorruptCheckpointError(f"{path}: unreadable checkpoint (empty file)")
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        # After the load, so a truncated file keeps torch's reason; weights_only runs no code.
        if (problem := digest_problem(path)) is not None:
            raise CorruptCheckpointError(f"{path}: unreadable checkpoint ({problem}; {size} bytes)")
    except CorruptCheckpointError:
        raise
    except Exception as e:  # truncated or damaged: torch raises RuntimeError, EOFError, OSError, ...
        # torch's first sentence is the reason; the rest is advice about other file formats.
        reason = " ".join(str(e).split()).split(". ")[0][:200]
        raise CorruptCheckpointError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {reason}; {size} bytes)"
        ) from e
    return _checked(state, path)


def _checked(state: Any, path: Path | RemotePath) -> dict:
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint (holds a {type(state).__name__})")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def _read_remote(path: RemotePath, *, map_location: str | torch.device) -> dict:
    """Download ``state.pt`` to a local temporary file and load it from there (torch.load reads a
    zip archive at random offsets: many small ranged GETs if it read the object directly)."""
    with tempfile.TemporaryDirectory(prefix="eiw-ckpt-read-") as tmp:
        local = Path(tmp) / STATE_FILE
        path.download_to(local)
        size = local.stat().st_size
        if size == 0:
            raise CorruptCheckpointError(f"{path}: unreadable checkpoint (empty file)")
        digest = Path(tmp) / DIGEST_FILE
        if (path.parent / DIGEST_FILE).is_file():
            (path.parent / DIGEST_FILE).download_to(digest)
        try:
            state = torch.load(local, map_location=map_location, weights_only=True)
        except Exception as e:
            reason = " ".join(str(e).split()).split(". ")[0][:200]
            raise CorruptCheckpointError(
                f"{path}: unreadable checkpoint ({type(e).__name__}: {reason}; {size} bytes)"
            ) from e
        if (problem := digest_problem(local, digest)) is not None:
            raise CorruptCheckpointError(f"{path}: unreadable checkpoint ({problem}; {size} bytes)")
    return _checked(state, path)


@dataclass
class FoundCheckpoint:
    """The checkpoint a resume uses, and the newer ones it had to pass over ("path: reason" each)."""

    directory: Path | RemotePath
    state: dict
    unreadable: list[str] = field(default_factory=list)


def read_newest_intact(
    candidates: Iterable[str | os.PathLike],
    *,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> FoundCheckpoint | None:
    """The first of ``candidates`` (newest first) that reads as a complete checkpoint.

    None when there are no candidates; ValueError naming every one (with its reason) when none is intact:
    starting the run over silently would drop its progress and its MLflow run.
    """
    unreadable: list[str] = []
    for directory in candidates:
        try:
            state = read_checkpoint(directory, map_location=map_location, mmap=mmap)
            missing = [k for k in RESUME_KEYS if k not in state]
            if missing:
                raise CorruptCheckpointError(
                    f"{as_path(directory) / STATE_FILE}: incomplete checkpoint (no {', '.join(missing)})"
                )
        except CorruptCheckpointError as e:
            unreadable.append(str(e))
            continue
        return FoundCheckpoint(as_path(directory), state, unreadable)
    if unreadable:
        raise ValueError(
            f"no intact checkpoint to resume from: {'; '.join(unreadable)}. Move these checkpoint "
            "directories away to start the run over, or train under another run.name"
        )
    return None


# ---------------------------------------------------------------------------- stale staging dirs
def _writer_alive(host: str | None, pid: int) -> bool | None:
    """Whether process ``pid`` lives; None when it ran on another host (cannot be checked here)."""
    if host is not None and host != writer_id().rsplit(".", 1)[0]:
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except (OverflowError, OSError):
        return False  # not a pid this system can have
    try:  # a killed writer that its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _last_written(path: Path) -> float:
    """The newest mtime of ``path`` and everything in it (symlinks not followed)."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def dead_staging(directory: str | os.PathLike, pattern: re.Pattern[str] = STAGING_NAME) -> list[Path]:
    """Staging directories in ``directory`` named by ``pattern`` (groups ``pid``, optional ``host``)
    whose writer is gone: its pid is not alive on this host, or nothing was written in them for
    ``STALE_AFTER_S``. Plain directories only (never a symlink); nothing else is looked at."""
    d = Path(directory)
    if not d.is_dir():
        return []
    dead = []
    for p in sorted(d.iterdir()):
        m = pattern.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        try:
            stale = time.time() - _last_written(p) > STALE_AFTER_S
        except OSError:
            continue  # gone meanwhile
        if stale or _writer_alive(m.groupdict().get("host"), int(m["pid"])) is False:
            dead.append(p)
    return dead


# ------------------------------------------------------------------------- local checkpoint dirs
class LocalCheckpoints:
    """Checkpoints of one run in ``directory/checkpoint_<step>`` (the same names Ray Train uses).

    Used by the plain loop without Ray: ``staging`` gives a temporary directory on the same file
    system, ``commit`` renames it into place and keeps the newest ``num_to_keep``. ``clean_stale``
    (run by ``staging`` and before a resume) removes the staging directories of writers that are gone.
    """

    def __init__(self, directory: str | os.PathLike, *, num_to_keep: int) -> None:
        self.directory = Path(directory)
        self.num_to_keep = num_to_keep

    def all(self) -> list[Path]:
        return list_checkpoints(self.directory)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def staging(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.directory / f"{TMP_PREFIX}{name}.{writer_id()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def clean_stale(self) -> None:
        """Remove the staging directories of writers that are gone (a kill, a full disk), so their
        partial files do not hold the space the next checkpoint needs. A checkpoint its writer had
        moved aside (``.tmp-old-``) when it died before renaming the new one in goes back in place."""
        for p in dead_staging(self.directory):
            m = STAGING_NAME.match(p.name)
            assert m is not None
            final = self.directory / m["name"]
            if m["old"] and not final.exists():
                os.replace(p, final)
                log.warning("%s: put back as %s (its writer died while replacing it)", p, final.name)
            else:
                shutil.rmtree(p, ignore_errors=True)
                if not p.exists():
                    log.warning("%s: removed, the staging directory of a writer that is gone", p)

    def commit(self, staged: Path, name: str) -> Path:
        final = self.directory / name
        trash = None
        if final.exists():
            # Re-reaching a step after a resume: move the old state aside first, so that a crash
            # in between still leaves one complete checkpoint under a checkpoint_* name or the old one.
            trash = self.directory / f"{TMP_PREFIX}old-{name}.{writer_id()}"
            os.replace(final, trash)
        os.replace(staged, final)
        _fsync_dir(self.directory)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for old in self.all()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# ------------------------------------------------------------------ checkpoints in object storage
# Local staging directories of ObjectCheckpoints (and of the Ray adapter): eiw-ckpt-<pid>-<random>.
OBJECT_STAGING_PREFIX = "eiw-ckpt-"
OBJECT_STAGING_NAME = re.compile(rf"^{OBJECT_STAGING_PREFIX}(?P<pid>[0-9]+)-[a-z0-9_]+$")


class ObjectCheckpoints:
    """``LocalCheckpoints`` for a run folder in object storage (``s3://bucket/prefix/checkpoints/<run>``).

    ``staging`` is a local temporary directory; ``commit`` uploads its files with ``state.pt`` last,
    the object whose presence makes the checkpoint (module doc). Re-reaching a step overwrites its
    objects; the old ``state.pt`` stays readable until the new one's upload completes.
    """

    def __init__(self, directory: str | RemotePath, *, num_to_keep: int) -> None:
        directory = as_path(directory)
        assert isinstance(directory, RemotePath), directory
        self.directory = directory
        self.num_to_keep = num_to_keep

    def all(self) -> list[RemotePath]:
        return list_checkpoints(self.directory)

    def latest(self) -> RemotePath | None:
        found = self.all()
        return found[-1] if found else None

    def staging(self, name: str) -> Path:
        self.clean_stale()
        return Path(tempfile.mkdtemp(prefix=f"{OBJECT_STAGING_PREFIX}{os.getpid()}-"))

    def clean_stale(self) -> None:
        """Remove local staging directories of writers that are gone. An upload that died leaves at
        most objects without ``state.pt`` (not a checkpoint; overwritten when the step comes again) and
        an unfinished multipart upload, which the store never shows (a bucket lifecycle rule
        ``AbortIncompleteMultipartUpload`` reclaims its space)."""
        for p in dead_staging(tempfile.gettempdir(), OBJECT_STAGING_NAME):
            shutil.rmtree(p, ignore_errors=True)

    def commit(self, staged: Path, name: str) -> RemotePath:
        final = self.directory / name
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        for p in sorted(files, key=lambda p: p.name == STATE_FILE):  # state.pt last: the commit point
            (final / p.relative_to(staged).as_posix()).upload_from(p)
        shutil.rmtree(staged, ignore_errors=True)
        for old in self.all()[: -self.num_to_keep]:
            (old / STATE_FILE).unlink(missing_ok=True)  # first: no longer a checkpoint
            old.rmtree()
        return final


def run_checkpoints(directory: str | os.PathLike | RemotePath, *, num_to_keep: int):
    """``LocalCheckpoints`` for a local folder, ``ObjectCheckpoints`` for an object-storage URI."""
    d = as_path(directory)
    if isinstance(d, RemotePath):
        return ObjectCheckpoints(d, num_to_keep=num_to_keep)
    return LocalCheckpoints(d, num_to_keep=num_to_keep)
