"""Downsampled ImageNet, npz release (Chrabaszcz et al. 2017): 64x64, 32x32 (and 16, 8) variants.

Layout under --input (the 64x64 release shown; 32x32 has one `Imagenet32_train_npz/` with all ten):
    Imagenet64_train_part1_npz/train_data_batch_{1..5}.npz
    Imagenet64_train_part2_npz/train_data_batch_{6..10}.npz
    Imagenet64_val_npz/val_data.npz
Each npz holds `data` (N x 3*R*R uint8, planar: all R, then G, then B) and `labels` (1..1000).
Output split `train` <- the ten train batches, `test` <- val_data (the release has no test labels).
Labels are stored 0-based (`cls = label - 1`, manifest `label_offset: -1`).

A batch is ~1.6 GB, so rows are streamed from the zip member (np.load of an npz cannot mmap), one
block at a time; a worker handles a contiguous run of shards and reads each file it touches once.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.convert import SplitSource
from data_prep.images import encode_png
from data_prep.labels import integer_labels
from data_prep.sources import Source
from data_prep.writer import Sample

KNOWN_RESOLUTIONS = (8, 16, 32, 64)
N_TRAIN_BATCHES = 10
BLOCK_ROWS = 512
LABEL_OFFSET = -1
NUM_CLASSES = 1000  # every downsampled ImageNet release keeps the 1000 ILSVRC-2012 classes


@dataclass(frozen=True, kw_only=True)
class ImagenetOptions:
    input: Path
    resolution: int | None = None  # None: inferred from the folder names and the data width
    splits: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True, kw_only=True)
class NpzFile:
    path: Path
    rel: str
    rows: int
    size: int


def _train_dirs(r: int) -> list[str]:
    return [
        f"Imagenet{r}_train_part1_npz",
        f"Imagenet{r}_train_part2_npz",
        f"Imagenet{r}_train_npz",
        f"Imagenet{r}_train",
        "",
    ]


def _val_dirs(r: int) -> list[str]:
    return [f"Imagenet{r}_val_npz", f"Imagenet{r}_val", ""]


def _detect_resolution(root: Path, requested: int | None) -> int | None:
    found = sorted(
        {r for r in KNOWN_RESOLUTIONS for d in _train_dirs(r)[:-1] + _val_dirs(r)[:-1] if (root / d).is_dir()}
    )
    if requested is not None:
        if requested not in KNOWN_RESOLUTIONS:
            raise ValueError(f"--resolution must be one of {KNOWN_RESOLUTIONS}, got {requested}")
        return requested
    if len(found) > 1:
        raise ValueError(
            f"{root} holds several releases ({', '.join(f'Imagenet{r}' for r in found)}); "
            "pick one with --resolution"
        )
    return found[0] if found else None  # None: files lie directly in root; the width decides


def _find(root: Path, dirs: list[str], name: str) -> Path:
    for d in dirs:
        if (root / d / name).is_file():
            return root / d / name
    raise ValueError(
        f"missing {root / (dirs[0] or '.') / name} (looked in: {', '.join(d or '.' for d in dirs)})"
    )


def read_header(path: Path) -> tuple[int, int]:
    """(rows, width) of the `data` array, from the npy header only; checks the npz is readable."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"data.npy", "labels.npy"} <= names:
                raise ValueError(f"{path}: npz must hold 'data' and 'labels', found {sorted(names)}")
            with zf.open("data.npy") as f:
                shape, dtype = _npy_header(f, path)
                _check_declared_size(path, "data", zf.getinfo("data.npy").file_size, f.tell(), shape, dtype)
            with zf.open("labels.npy") as f:
                label_shape, label_dtype = _npy_header(f, path, "labels")
                size = zf.getinfo("labels.npy").file_size
                _check_declared_size(path, "labels", size, f.tell(), label_shape, label_dtype)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable npz, truncated or corrupt ({exc})") from exc
    except zlib.error as exc:
        raise ValueError(f"{path}: corrupt deflate stream ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if dtype != np.uint8 or len(shape) != 2:
        raise ValueError(f"{path}: 'data' must be a 2-D uint8 array, got {dtype} {shape}")
    return shape[0], shape[1]


def _check_declared_size(path: Path, name: str, member_size: int, header_end: int, shape, dtype) -> None:
    """The npy header's shape x itemsize must be what the zip member holds: a header that declares
    2**40 rows would otherwise be believed (np.load allocates it: MemoryError) or read past its end."""
    if dtype.hasobject:
        raise ValueError(f"{path}: '{name}' holds Python objects; an npz release holds numbers only")
    declared = math.prod(shape) * dtype.itemsize
    if header_end + declared != member_size:
        raise ValueError(
            f"{path}: '{name}' declares shape {shape} of {dtype} ({declared} bytes), but its member holds "
            f"{member_size - header_end} bytes after the header: truncated or corrupt"
        )


def _npy_header(f, path: Path, name: str = "data"):
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read(f)
    except ValueError as exc:
        raise ValueError(f"{path}: '{name}' is not a valid npy array ({exc})") from exc
    if fortran_order:
        raise ValueError(f"{path}: '{name}' is Fortran-ordered; expected C order")
    return shape, dtype


def read_labels(path: Path, rows: int) -> np.ndarray:
    """The release's labels (1..1000), checked; ValueError naming the file, value and row otherwise."""
    try:
        with np.load(path) as z:  # allow_pickle stays False: an object array is refused, not run
            raw = np.asarray(z["labels"])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read 'labels' ({type(exc).__name__}: {exc})") from exc
    if raw.size != rows:
        raise ValueError(f"{path}: {raw.size} labels for {rows} images")
    try:
        return integer_labels(raw, low=1, high=NUM_CLASSES, where=f"{path}: 'labels'")
    except ValueError as exc:
        raise ValueError(
            f"{exc}; the npz release's labels are 1-based class numbers 1..{NUM_CLASSES} "
            "(is this the npz release?)"
        ) from None


def _inspect(root: Path, paths: list[Path], resolution: int | None) -> tuple[list[NpzFile], int]:
    files, res = [], resolution
    for p in paths:
        rows, width = read_header(p)
        r = int(round((width / 3) ** 0.5))
        if 3 * r * r != width or r not in KNOWN_RESOLUTIONS:
            raise ValueError(f"{p}: data width {width} is not 3*R*R for R in {KNOWN_RESOLUTIONS}")
        if res is None:
            res = r
        elif r != res:
            raise ValueError(
                f"{p}: data width {width} means {r}x{r} images, expected {res}x{res} (width {3 * res * res})"
            )
        read_labels(p, rows)  # small; failing here beats failing after hours of shards
        files.append(NpzFile(path=p, rel=str(p.relative_to(root)), rows=rows, size=p.stat().st_size))
    assert res is not None
    return files, res


@dataclass(frozen=True, kw_only=True)
class ImagenetSplit(SplitSource):
    split: str
    files: tuple[NpzFile, ...]
    resolution: int

    def __len__(self) -> int:
        return sum(f.rows for f in self.files)

    def dataset_config(self) -> dict:
        return {"source": "imagenet", "resolution": self.resolution, "label_offset": LABEL_OFFSET}

    def inputs(self) -> list:
        return [[f.rel, f.size, f.rows] for f in self.files]

    def manifest_fields(self) -> dict:
        return {
            "resolution": [self.resolution, self.resolution],
            "channels": 3,
            "label_offset": LABEL_OFFSET,
            "num_classes": NUM_CLASSES,
            "source_split": "val" if self.split == "test" else "train",
            "notes": "cls = source label + label_offset: the npz labels are 1..1000, stored 0-based. "
            "Pixels are the npz rows reshaped (3, R, R) -> HWC, unchanged.",
        }

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        offset = 0
        for f in self.files:
            lo, hi = max(start, offset), min(stop, offset + f.rows)
            if lo < hi:
                yield from self._rows(f, lo - offset, hi - offset)
            offset += f.rows

    def _rows(self, f: NpzFile, a: int, b: int) -> Iterator[Sample]:
        r = self.resolution
        width = 3 * r * r
        labels = read_labels(f.path, f.rows)
        stem = f.path.stem
        try:
            with zipfile.ZipFile(f.path) as zf, zf.open("data.npy") as stream:
                _npy_header(stream, f.path)
                # Seeking a deflated member decompresses and discards; once per chunk, not per shard.
                stream.seek(stream.tell() + a * width)
                row = a
                while row < b:
                    k = min(BLOCK_ROWS, b - row)
                    buf = stream.read(k * width)
                    if len(buf) != k * width:
                        raise ValueError(
                            f"{f.path}: truncated 'data' (ends inside row {row + len(buf) // width})"
                        )
                    block = np.frombuffer(buf, np.uint8).reshape(k, 3, r, r).transpose(0, 2, 3, 1)
                    for i in range(k):
                        yield Sample(
                            key=f"{stem}_{row + i:07d}",
                            png=encode_png(block[i]),
                            label=int(labels[row + i]) + LABEL_OFFSET,
                        )
                    row += k
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{f.path}: corrupt or truncated npz ({type(exc).__name__}: {exc})") from exc


def imagenet_sources(opts: ImagenetOptions) -> list[ImagenetSplit]:
    root = Path(opts.input)
    if not root.is_dir():
        raise ValueError(f"--input {root} is not a directory")
    r = _detect_resolution(root, opts.resolution)
    dirs = {"train": _train_dirs(r) if r else [""], "test": _val_dirs(r) if r else [""]}
    names = {
        "train": [f"train_data_batch_{k}.npz" for k in range(1, N_TRAIN_BATCHES + 1)],
        "test": ["val_data.npz"],
    }
    out = []
    for split in opts.splits:
        if split not in names:
            raise ValueError(f"unknown split {split!r} for imagenet (train, test)")
        if split == "train" and r == 64:
            paths = [
                _find(root, [f"Imagenet64_train_part{1 if k <= 5 else 2}_npz"] + dirs["train"], n)
                for k, n in enumerate(names["train"], start=1)
            ]
        else:
            paths = [_find(root, dirs[split], n) for n in names[split]]
        files, res = _inspect(root, paths, r)
        r = r or res
        out.append(ImagenetSplit(split=split, files=tuple(files), resolution=res))
    return out


def _add_options(parser) -> None:
    parser.add_argument(
        "--resolution",
        type=int,
        choices=KNOWN_RESOLUTIONS,
        default=None,
        help="which release when --input holds several (default: inferred)",
    )


def _build(args) -> list[ImagenetSplit]:
    return imagenet_sources(ImagenetOptions(input=args.input, resolution=args.resolution, splits=args.splits))


SOURCE = Source(
    name="imagenet",
    help="downsampled ImageNet npz release (64x64, 32x32)",
    description="Imagenet64_train_part{1,2}_npz/train_data_batch_*.npz and Imagenet64_val_npz/"
    "val_data.npz (or the Imagenet32 equivalents); val becomes the test split; "
    "labels stored 0-based.",
    add_options=_add_options,
    build=_build,
)
