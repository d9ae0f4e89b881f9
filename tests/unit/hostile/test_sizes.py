"""Hostile inputs, class 3 (issue 21): sizes a file declares are checked against the file before
anything is allocated or mapped, and corrupt streams are named errors.

Real files: npz archives written by numpy and edited, a real lmdb truncated. The converters run in a
subprocess where a signal (a truncated lmdb used to SIGBUS) would kill it, so the test sees it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import lmdb
import numpy as np

ROOT = Path(__file__).resolve().parents[3]


def data_prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args, "--no-progress", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess, *names: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert all(n in lines[0] for n in names), lines[0]
    return lines[0]


def imagenet_val(root: Path, compressed: bool = False) -> Path:
    path = root / "Imagenet32_val_npz" / "val_data.npz"
    path.parent.mkdir(parents=True)
    data = np.zeros((4, 3 * 32 * 32), np.uint8)
    (np.savez_compressed if compressed else np.savez)(path, data=data, labels=np.ones(4, np.int64))
    return path


def rewrite_member(path: Path, name: str, edit) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = edit(members[name])
    with zipfile.ZipFile(path, "w") as zf:
        for n, raw in members.items():
            zf.writestr(n, raw)


def test_npz_header_declaring_2_to_the_40_rows(tmp_path):
    path = imagenet_val(tmp_path / "in")
    rewrite_member(path, "labels.npy", lambda raw: raw.replace(b"(4,)", b"(1099511627776,)"))
    done = data_prep("imagenet", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--resolution", "32", "--splits", "test")  # fmt: skip
    one_error_line(done, "val_data.npz", "labels", "1099511627776")


def test_npz_data_header_larger_than_its_member(tmp_path):
    path = imagenet_val(tmp_path / "in")
    rewrite_member(path, "data.npy", lambda raw: raw.replace(b"(4, 3072)", b"(9, 3072)"))
    done = data_prep("imagenet", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--resolution", "32", "--splits", "test")  # fmt: skip
    one_error_line(done, "val_data.npz", "declares")


def test_corrupt_deflate_stream_is_a_named_error(tmp_path):
    path = imagenet_val(tmp_path / "in", compressed=True)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("labels.npy")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + info.compress_size - 2):
        raw[i] ^= 0x5A  # every byte of the compressed labels: not a deflate stream any more
    path.write_bytes(bytes(raw))
    done = data_prep("imagenet", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--resolution", "32", "--splits", "test")  # fmt: skip
    one_error_line(done, "val_data.npz")


def test_truncated_lmdb_is_an_error_not_sigbus(tmp_path):
    import io

    from PIL import Image

    db = tmp_path / "in" / "bedroom_train_lmdb"
    db.parent.mkdir(parents=True)
    env = lmdb.open(str(db), map_size=1 << 26)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(40):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
            txn.put(f"{i:040x}".encode(), buf.getvalue())
    env.close()
    data = db / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 3)
    done = data_prep("lsun", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--categories", "bedroom", "--splits", "train")  # fmt: skip
    one_error_line(done, "bedroom_train_lmdb", "truncated")
