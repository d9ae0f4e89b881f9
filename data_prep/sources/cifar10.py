"""CIFAR-10, python version: `cifar-10-batches-py/data_batch_{1..5}` and `test_batch`.

Each batch is a pickle of a dict with b"data" (10000 x 3072 uint8, planar: 1024 R, 1024 G, 1024 B,
row-major 32x32) and b"labels" (0..9). Labels are already 0-based (label_offset 0). --input may be
the `cifar-10-batches-py` folder or its parent. Batches are never unpickled: data_prep/cifar_pickle.py
reads the pickle opcodes and accepts exactly the official structure, building the array from the
raw bytes after checking its declared shape against them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.cifar_pickle import CifarPickleError, read_batch
from data_prep.convert import SplitSource
from data_prep.images import encode_png
from data_prep.labels import integer_labels
from data_prep.sources import Source
from data_prep.writer import Sample

FOLDER = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
WIDTH = 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True, kw_only=True)
class Cifar10Options:
    input: Path
    splits: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True, kw_only=True)
class BatchFile:
    path: Path
    rows: int
    size: int


@functools.lru_cache(maxsize=2)
def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data (N, 32, 32, 3) uint8, labels (N,) int64); ValueError naming the file on any defect."""
    try:
        # Never unpickle: a batch file is data from the internet; even numpy's own rebuilders,
        # given a forged dtype, read its bytes as object pointers. See data_prep/cifar_pickle.py.
        d = read_batch(path)
    except FileNotFoundError:
        raise ValueError(f"missing {path}") from None
    except CifarPickleError as exc:
        raise ValueError(f"{path}: not a CIFAR-10 batch we can read safely ({exc})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != WIDTH:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be an N x {WIDTH} uint8 array, got {got}")
    labels = integer_labels(d[b"labels"], low=0, high=len(CLASSES) - 1, where=f"{path}: b'labels'")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@dataclass(frozen=True, kw_only=True)
class Cifar10Split(SplitSource):
    split: str
    files: tuple[BatchFile, ...]

    def __len__(self) -> int:
        return sum(f.rows for f in self.files)

    def dataset_config(self) -> dict:
        return {"source": "cifar10", "resolution": 32}

    def inputs(self) -> list:
        return [[f.path.name, f.size, f.rows] for f in self.files]

    def manifest_fields(self) -> dict:
        return {
            "resolution": [32, 32],
            "channels": 3,
            "label_offset": 0,
            "num_classes": 10,
            "classes": list(CLASSES),
            "source_split": self.split,
            "notes": "Pixels are the pickled rows reshaped (3, 32, 32) -> HWC, unchanged.",
        }

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        offset = 0
        for f in self.files:
            lo, hi = max(start, offset), min(stop, offset + f.rows)
            if lo < hi:
                data, labels = load_batch(f.path)
                for row in range(lo - offset, hi - offset):
                    yield Sample(
                        key=f"{f.path.name}_{row:05d}", png=encode_png(data[row]), label=int(labels[row])
                    )
            offset += f.rows


def cifar10_sources(opts: Cifar10Options) -> list[Cifar10Split]:
    root = Path(opts.input)
    folder = root if (root / "test_batch").exists() or root.name == FOLDER else root / FOLDER
    if not folder.is_dir():
        raise ValueError(f"--input {root}: no {FOLDER}/ folder there")
    out = []
    for split in opts.splits:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r} for cifar10 (train, test)")
        files = []
        for name in SPLIT_FILES[split]:
            path = folder / name
            if not path.is_file():
                raise ValueError(f"missing {path}")
            data, _ = load_batch(path)
            files.append(BatchFile(path=path, rows=len(data), size=path.stat().st_size))
        out.append(Cifar10Split(split=split, files=tuple(files)))
    load_batch.cache_clear()  # the workers reload; keep the parent small
    return out


def _build(args) -> list[Cifar10Split]:
    return cifar10_sources(Cifar10Options(input=args.input, splits=args.splits))


SOURCE = Source(
    name="cifar10",
    help="CIFAR-10 python batches",
    description="cifar-10-batches-py/data_batch_1..5 -> train, test_batch -> test.",
    add_options=lambda parser: None,  # nothing beyond the shared options
    build=_build,
)
