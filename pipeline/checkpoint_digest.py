"""A content digest per checkpoint: ``state.pt.sha256`` beside ``state.pt``, checked on every load.

``torch.load`` checks the zip structure of ``state.pt`` but not the bytes of the tensors in it: bits
flipped inside a weight (a bad disk, a torn copy between stores) load silently, and the run resumes
from, evaluates and registers a model that is not the one trained (bits/dim NaN, say). The digest
is the sha256 of the whole ``state.pt``, written after it (in a local checkpoint: last of the
checkpoint's files, before the directory is renamed into place; in object storage it is uploaded
before ``state.pt``, the commit point, so a checkpoint never appears without it). On load a mismatch
makes the checkpoint unreadable, and ``read_newest_intact`` falls back to the previous one, as for a
truncated file.

A checkpoint written before digests existed has no ``state.pt.sha256``: it is still read (with a
warning), since everything else about it is as before; a digest file that is present but malformed
is a mismatch.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from data_prep.writer import sha256_file

log = logging.getLogger(__name__)

DIGEST_FILE = "state.pt.sha256"
_LINE = re.compile(r"^(?P<hex>[0-9a-f]{64})  state\.pt\n?$")


def write_digest(directory: Path, state_file: str = "state.pt") -> None:
    """Write ``directory/state.pt.sha256`` (sha256sum's format) for ``directory/state.pt``, atomically."""
    digest = sha256_file(directory / state_file)
    path = directory / DIGEST_FILE
    tmp = path.with_name(f".tmp-{DIGEST_FILE}.{os.getpid()}")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{digest}  {state_file}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def digest_problem(state_path: Path, digest_path: Path | None = None) -> str | None:
    """Why ``state_path`` does not match its recorded digest, or None when it does (or has none).

    ``digest_path`` defaults to the sibling ``state.pt.sha256``; pass a local copy for a checkpoint
    downloaded from object storage."""
    digest_path = digest_path if digest_path is not None else state_path.with_name(DIGEST_FILE)
    if not digest_path.is_file():
        log.warning("%s: no %s (written before checkpoint digests); not verified", state_path, DIGEST_FILE)
        return None
    try:
        m = _LINE.match(digest_path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable {DIGEST_FILE} ({exc})"
    if m is None:
        return f"malformed {DIGEST_FILE}"
    actual = sha256_file(state_path)
    if actual != m["hex"]:
        return f"content digest mismatch (sha256 {actual[:12]}..., {DIGEST_FILE} says {m['hex'][:12]}...)"
    return None
