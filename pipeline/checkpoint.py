"""Training checkpoints: one directory holding ``state.pt`` (everything needed to resume) and
``config.yaml`` (the resolved config, for people).

Writes are atomic at two levels: each file is written to a temporary sibling, fsynced and renamed,
and ``LocalCheckpoints.commit`` renames a complete temporary directory into place, so a crash leaves
either the previous checkpoint or the new one, never a half-written one. Under Ray Train the
directory is handed to ``ray.train.report``, which registers it only once it is fully persisted.

``state.pt`` holds plain containers of tensors and numbers (loadable with ``weights_only=True``):
step, epoch, model/optimizer/scheduler state dicts, per-rank RNG states, the config as a dict, the
MLflow run id and the non-finite-step counter.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
PREFIX = "checkpoint_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


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
    _fsync_dir(d)
    return d


def read_checkpoint(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """The state dict written by ``write_checkpoint``; ValueError if the directory holds none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a checkpoint (no {STATE_FILE})")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


# ------------------------------------------------------------------------------------ RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch CPU, the current CUDA device, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------- local checkpoint dirs
class LocalCheckpoints:
    """Checkpoints of one run in ``directory/checkpoint_<step>`` (the same names Ray Train uses).

    Used by the plain loop without Ray: ``staging`` gives a temporary directory on the same file
    system, ``commit`` renames it into place and keeps the newest ``num_to_keep``.
    """

    def __init__(self, directory: str | os.PathLike, *, num_to_keep: int) -> None:
        self.directory = Path(directory)
        self.num_to_keep = num_to_keep

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def staging(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{TMP_PREFIX}{name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, staged: Path, name: str) -> Path:
        final = self.directory / name
        trash = None
        if final.exists():
            # Re-reaching a step after a resume: move the old state aside first, so that a crash
            # in between still leaves one complete checkpoint under a checkpoint_* name or the old one.
            trash = self.directory / f"{TMP_PREFIX}old-{name}.{os.getpid()}"
            os.replace(final, trash)
        os.replace(staged, final)
        _fsync_dir(self.directory)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for old in self.all()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
