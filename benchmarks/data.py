"""Data pipeline throughput: npz -> shards conversion, and shard reading through train_loader.

    python -m benchmarks.data [--images 20000] [--workers 2] [--read-batches 150]

Builds a synthetic ImageNet-64 release in a temp dir (official layout, uncompressed npz like the
real files): 64x64 crops of scikit-image's bundled photographs at random scales, so PNG sizes and
decode costs resemble real photos (noise would be ~2x larger and slower). Then measures
1. conversion (`python -m data_prep imagenet`) in images/s, total and per worker process;
2. reading through `train_loader(num_workers=0)` (tar parse, shard sha256 check, shuffle buffer,
   PNG decode, uint8 batches) in images/s on one core, the same without the sha256 check (its
   cost, printed as a ratio), and the PNG decode alone for reference.
Both wall-clock rates and images per CPU-second (this process plus its reaped worker processes)
are printed: on a shared machine the CPU-second rate is the per-core figure that transfers.
Prints one table. Numbers go to docs/benchmarks.md, section "Data (data_prep)".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import shard_reading
from data_prep.loading import decode_png, train_loader
from data_prep.sources.sample import available_photos, load_photo

REPO = Path(__file__).resolve().parents[1]


def synthetic_release(root: Path, n_train: int, n_val: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(load_photo(f)) for files in available_photos().values() for f in files]
    pyramids = []
    for p in photos:  # a few scales per photo, so crops cover 64..256 px of the original
        img = Image.fromarray(p)
        for s in (1, 2, 4):
            if min(img.size) // s >= 64:
                pyramids.append(
                    np.asarray(img.resize((img.width // s, img.height // s), Image.Resampling.BOX))
                )

    def batch(n: int) -> np.ndarray:
        out = np.empty((n, 3, 64, 64), np.uint8)
        for i in range(n):
            a = pyramids[rng.integers(len(pyramids))]
            y, x = rng.integers(0, a.shape[0] - 63), rng.integers(0, a.shape[1] - 63)
            out[i] = a[y : y + 64, x : x + 64].transpose(2, 0, 1)
        return out.reshape(n, -1)

    per = n_train // 10
    for k in range(1, 11):
        d = root / f"Imagenet64_train_part{1 if k <= 5 else 2}_npz"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / f"train_data_batch_{k}.npz", data=batch(per), labels=rng.integers(1, 1001, per))
    (root / "Imagenet64_val_npz").mkdir(exist_ok=True)
    np.savez(
        root / "Imagenet64_val_npz" / "val_data.npz", data=batch(n_val), labels=rng.integers(1, 1001, n_val)
    )


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the conversion's worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Wall and CPU seconds: on a shared machine CPU seconds are the honest per-core measure."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def convert(root: Path, out: Path, workers: int, png_level: int) -> Timer:
    # A subprocess, as users run it: spawned workers then import only the converter, not this
    # script's torch; its CPU time (and its workers') lands in RUSAGE_CHILDREN once it exits.
    args = ["imagenet", "--input", str(root), "--output", str(out), "--splits", "train"]
    args += [
        "--workers",
        str(workers),
        "--shard-size",
        "2000",
        "--no-progress",
        "--png-level",
        str(png_level),
    ]
    with Timer() as t:
        subprocess.run([sys.executable, "-m", "data_prep", *args], check=True, cwd=REPO)
    return t


def read_rate(split_dir: Path, batches: int, batch_size: int = 256, verify: bool = True) -> tuple[int, Timer]:
    loader = train_loader(
        split_dir, batch_size=batch_size, batches_per_epoch=batches, shuffle_buffer=1000, verify=verify
    )
    next(iter(train_loader(split_dir, batch_size=8, batches_per_epoch=1)))  # warm file cache and imports
    with Timer() as t:
        n = sum(b.shape[0] for b in loader)
    return n, t


@contextlib.contextmanager
def every_read_hashed():
    """The loader with its per-process memory of intact shards disabled (a fresh worker per read)."""

    class Forgetful(set):
        def add(self, item) -> None:
            pass

    held, shard_reading._VERIFIED = shard_reading._VERIFIED, Forgetful()
    try:
        yield
    finally:
        shard_reading._VERIFIED = held


def decode_rate(split_dir: Path, n: int = 3000) -> tuple[int, Timer]:
    import tarfile

    pngs = []
    with tarfile.open(next(split_dir.glob("*.tar"))) as tar:
        for m in tar:
            if m.name.endswith(".png") and len(pngs) < n:
                pngs.append(tar.extractfile(m).read())
    with Timer() as t:
        for p in pngs:
            decode_png(p)
    return len(pngs), t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--read-batches", type=int, default=150)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root, tmp = Path(tmp) / "in", Path(tmp)
        t0 = time.perf_counter()
        synthetic_release(root, args.images, 1000)
        print(f"# synthetic release: {args.images} train images in {time.perf_counter() - t0:.1f} s")
        rows, sizes = [], {}
        for level in (0, 1):  # 0 is the default; 1 shows what the smaller shards cost in decode time
            for w in sorted({1, args.workers}) if level == 0 else (1,):
                t = convert(root, tmp / f"out{level}-{w}", w, level)
                rows.append((f"convert npz -> shards, {w} worker(s), png-level {level}", args.images, t, w))
            split = tmp / f"out{level}-1" / "train"
            sizes[level] = sum(p.stat().st_size for p in split.glob("*.tar")) / args.images
            n, t = read_rate(split, args.read_batches)
            rows.append((f"train_loader read, num_workers=0, png-level {level}", n, t, 1))
            if level == 0:  # the shard sha256 check against the same read without it, back to back
                n_off, t_off = read_rate(split, args.read_batches, verify=False)
                name = "train_loader read without the shard sha256 check, png-level 0"
                rows.append((name, n_off, t_off, 1))
                shard_reading._VERIFIED.clear()
                n_once, t_once = read_rate(split, args.read_batches)
                rows.append(("... with it, each shard hashed once per process", n_once, t_once, 1))
                with every_read_hashed():
                    n_all, t_all = read_rate(split, args.read_batches)
                rows.append(("... with it, every shard read hashed (worst case)", n_all, t_all, 1))
                off = n_off / t_off.cpu
                print(
                    f"# shard sha256 check, cost in loader images per CPU-second: "
                    f"{100 * (1 - n_once / t_once.cpu / off):+.1f}% hashing each shard once per process, "
                    f"{100 * (1 - n_all / t_all.cpu / off):+.1f}% hashing every read"
                )
            n, t = decode_rate(split)
            rows.append((f"PNG decode only (PIL -> numpy), png-level {level}", n, t, 1))
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}; shard bytes/image: "
        + ", ".join(f"png-level {k}: {v:.0f}" for k, v in sizes.items())
    )
    print("| measurement | images | wall s | images/s (wall) | per process (wall) | images per CPU-second |")
    print("|---|---|---|---|---|---|")
    for name, n, t, procs in rows:
        print(
            f"| {name} | {n} | {t.wall:.1f} | {n / t.wall:.0f} | {n / t.wall / procs:.0f} | {n / t.cpu:.0f} |"
        )


if __name__ == "__main__":
    main()
