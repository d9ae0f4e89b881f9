"""Any folder of images (e.g. CelebA's `img_align_celeba/*.jpg`), searched recursively.

Per image: decode, mode policy (RGB; grayscale replicated), optional `--crop-box left,top,right,bottom`
(CelebA 64x64 protocols crop a central box first), optional `--size S` (shorter side to S, bicubic,
central S x S crop). Without --size every image must come out the size of the first one.
Train/test split: sha256 of the path relative to --input; the first 8 bytes as a fraction in [0, 1)
below --test-fraction means test. Adding or removing files never moves another file across splits.
No labels. An unreadable file stops the conversion (a folder is curated by the user; a broken file
there is a mistake to fix, not noise to drop).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.convert import SplitSource
from data_prep.images import encode_png, open_file, shorter_side_center_crop, to_array, to_rgb
from data_prep.sources import Source
from data_prep.writer import Sample

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")


@dataclass(frozen=True, kw_only=True)
class FolderOptions:
    input: Path
    crop_box: tuple[int, int, int, int] | None = None
    size: int | None = None
    test_fraction: float = 0.05
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self):
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be positive, got {self.size}")
        if self.crop_box is not None:
            left, top, right, bottom = self.crop_box
            if not (0 <= left < right and 0 <= top < bottom):
                raise ValueError(
                    f"--crop-box must be left,top,right,bottom with left<right, top<bottom; "
                    f"got {self.crop_box}"
                )


def hash_fraction(rel: str) -> float:
    """Deterministic position of a file in [0, 1), from its relative path only."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0**64


def key_of(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0]
    key = _UNSAFE.sub("_", stem.replace("/", "__"))
    if len(key) > 90:  # USTAR names hold 100 bytes, and ".png" must fit after the key
        key = f"{key[:64]}_{hashlib.sha256(rel.encode()).hexdigest()[:20]}"
    return key


def list_images(root: Path) -> list[str]:
    rels = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in EXTENSIONS
    ]
    return sorted(r for r in rels if not any(part.startswith(".") for part in r.split("/")))


@dataclass(frozen=True, kw_only=True)
class FolderSplit(SplitSource):
    split: str
    root: Path
    files: tuple[str, ...]
    opts: FolderOptions
    resolution: tuple[int, int]  # (H, W)

    def __len__(self) -> int:
        return len(self.files)

    def dataset_config(self) -> dict:
        return {
            "source": "folder",
            "root": str(self.root.resolve()),
            "resolution": list(self.resolution),
            "crop_box": list(self.opts.crop_box) if self.opts.crop_box else None,
            "size": self.opts.size,
            "test_fraction": self.opts.test_fraction,
        }

    def inputs(self) -> list:
        # A digest, not the listing: CelebA has 200k files and this lands in every progress record.
        h = hashlib.sha256()
        for rel in self.files:
            h.update(f"{rel}\t{(self.root / rel).stat().st_size}\n".encode())
        return [len(self.files), h.hexdigest()]

    def manifest_fields(self) -> dict:
        h, w = self.resolution
        return {
            "resolution": [h, w],
            "channels": 3,
            "root": str(self.root.resolve()),
            "crop_box": list(self.opts.crop_box) if self.opts.crop_box else None,
            "size": self.opts.size,
            "test_fraction": self.opts.test_fraction,
            "notes": "no labels; split by sha256 of the relative path; crop box, then shorter side to "
            "size (bicubic) and central crop",
        }

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        for rel in self.files[start:stop]:
            img = transform(self.root / rel, self.opts, name=rel)
            if (img.height, img.width) != self.resolution:
                raise ValueError(
                    f"{self.root / rel}: comes out {img.height}x{img.width}, expected "
                    f"{self.resolution[0]}x{self.resolution[1]} like the first image (pass --size)"
                )
            yield Sample(key=key_of(rel), png=encode_png(to_array(img)))


def transform(path: Path, opts: FolderOptions, *, name: str):
    img = to_rgb(open_file(path, name=str(path)), name=str(path))
    if opts.crop_box is not None:
        left, top, right, bottom = opts.crop_box
        if right > img.width or bottom > img.height:
            raise ValueError(f"{path}: --crop-box {opts.crop_box} exceeds the {img.width}x{img.height} image")
        img = img.crop(opts.crop_box)
    if opts.size is not None:
        img = shorter_side_center_crop(img, opts.size)
    return img


def folder_sources(opts: FolderOptions) -> list[FolderSplit]:
    root = Path(opts.input)
    if not root.is_dir():
        raise ValueError(f"--input {root} is not a directory")
    files = list_images(root)
    if not files:
        raise ValueError(f"no images ({', '.join(EXTENSIONS)}) under {root}")
    seen: dict[str, str] = {}
    for rel in files:
        k = key_of(rel)
        if k in seen:
            raise ValueError(f"{root}: {seen[k]!r} and {rel!r} map to the same sample key {k!r}; rename one")
        seen[k] = rel
    if opts.size is not None:
        resolution = (opts.size, opts.size)
    else:
        first = transform(root / files[0], opts, name=files[0])
        resolution = (first.height, first.width)
    by_split = {"train": [], "test": []}
    for rel in files:
        by_split["test" if hash_fraction(rel) < opts.test_fraction else "train"].append(rel)
    out = []
    for split in opts.splits:
        if split not in by_split:
            raise ValueError(f"unknown split {split!r} for folder (train, test)")
        if split == "test" and opts.test_fraction == 0:
            continue
        out.append(
            FolderSplit(
                split=split, root=root, files=tuple(by_split[split]), opts=opts, resolution=resolution
            )
        )
    return out


def crop_box_argument(text: str) -> tuple[int, int, int, int]:
    """argparse type of --crop-box: four comma-separated integers."""
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--crop-box wants left,top,right,bottom integers, got {text!r}")
    return box  # type: ignore[return-value]


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--crop-box", type=crop_box_argument, default=None, help="left,top,right,bottom crop applied first"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="shorter side to SIZE, then central SIZE x SIZE crop"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.05, help="fraction of files in test (default 0.05)"
    )


def _build(args: argparse.Namespace) -> list[FolderSplit]:
    return folder_sources(
        FolderOptions(
            input=args.input,
            crop_box=args.crop_box,
            size=args.size,
            test_fraction=args.test_fraction,
            splits=args.splits,
        )
    )


SOURCE = Source(
    name="folder",
    help="any folder of images (e.g. CelebA img_align_celeba)",
    description="Recursive; split by a hash of the relative path; no labels.",
    add_options=_add_options,
    build=_build,
)
