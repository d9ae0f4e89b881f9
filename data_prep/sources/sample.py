"""The built-in sample set: crops of real photographs bundled with scikit-image (no network).

scikit-image ships a few photographs inside its wheel (`skimage/data/*.png|jpg`); the rest of
`skimage.data` downloads on demand, so this module never calls `skimage.data` functions: it reads
the bundled files directly and uses only the photographs present. Grayscale photos become RGB.

Each crop: a photo (round robin), a square side of 2R or 4R pixels (clamped to the photo), a
uniformly random position, bicubic resize to R x R. Train and test use disjoint photos (the stereo
pair motorcycle_left/right counts as one photo), so no test crop shares a scene with training.
Deterministic given the seed; the test photos are fixed so every seed evaluates on the same scenes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.convert import ConfigMismatch, RunOptions, SplitSource, convert_split
from data_prep.images import DEFAULT_PNG_LEVEL, RESAMPLE, encode_png, open_file, to_array, to_rgb
from data_prep.manifest import MANIFEST_NAME, PROGRESS_NAME, load_json, recorded_dataset
from data_prep.ownership import OUTPUT_RECORD, foreign_entries, locked, name_list, output_id
from data_prep.sources import Source
from data_prep.writer import Sample

# Real photographs only (no synthetic test patterns, logos or silhouettes); one entry per scene.
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "brick": ("brick.png",),
    "camera": ("camera.png",),
    "cell": ("cell.png",),
    "chelsea": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "ihc": ("ihc.png",),
    "moon": ("moon.png",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "page": ("page.png",),
    "retina": ("retina.jpg",),
    "rocket": ("rocket.jpg",),
    "text": ("text.png",),
}
TEST_PHOTOS = ("chelsea", "coffee", "coins")
SCALES = (2, 4)
RESOLUTIONS = (32, 64)
DEFAULT_COUNTS = {"train": 4000, "test": 500}
DEFAULT_SHARD_SIZE = 1000
SAMPLE_LOCK_NAME = ".sample.lock"  # serialises concurrent builders of one folder


@dataclass(frozen=True, kw_only=True)
class SampleOptions:
    resolution: int = 32
    n_train: int = DEFAULT_COUNTS["train"]
    n_test: int = DEFAULT_COUNTS["test"]
    seed: int = 0
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self):
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"--resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"--n-train and --n-test must be positive, got {self.n_train}, {self.n_test}")


def data_dir() -> Path:
    """skimage's bundled data folder, located without importing skimage.data (which sets up downloads)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("scikit-image is not installed; `pip install scikit-image` for the sample set")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def available_photos() -> dict[str, tuple[str, ...]]:
    """PHOTOS restricted to scenes whose every file is bundled locally."""
    d = data_dir()
    return {name: files for name, files in PHOTOS.items() if all((d / f).is_file() for f in files)}


@functools.cache
def load_photo(filename: str) -> Image.Image:
    return to_rgb(open_file(data_dir() / filename), name=filename)


@dataclass(frozen=True, kw_only=True)
class Crop:
    key: str
    file: str
    box: tuple[int, int, int, int]


def plan_crops(split: str, count: int, resolution: int, seed: int) -> tuple[Crop, ...]:
    photos = available_photos()
    test = [p for p in TEST_PHOTOS if p in photos]
    train = [p for p in photos if p not in TEST_PHOTOS]
    if not test or not train:
        raise ValueError(
            f"scikit-image bundles too few photos here ({sorted(photos)}) for a train/test split"
        )
    files = [f for p in (test if split == "test" else train) for f in photos[p]]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    crops = []
    for i in range(count):
        f = files[i % len(files)]
        w, h = load_photo(f).size
        side = min(SCALES[(i // len(files)) % len(SCALES)] * resolution, w, h)
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crops.append(Crop(key=f"{Path(f).stem}_{i:06d}", file=f, box=(left, top, left + side, top + side)))
    return tuple(crops)


@dataclass(frozen=True, kw_only=True)
class SampleSplit(SplitSource):
    split: str
    resolution: int
    seed: int
    crops: tuple[Crop, ...]

    def __len__(self) -> int:
        return len(self.crops)

    def dataset_config(self) -> dict:
        return {
            "source": "sample",
            "resolution": self.resolution,
            "photos": sorted(available_photos()),
            "test_photos": list(TEST_PHOTOS),
            "scales": list(SCALES),
        }

    def inputs(self) -> list:
        d = data_dir()
        return sorted({(c.file, (d / c.file).stat().st_size) for c in self.crops})

    def manifest_fields(self) -> dict:
        photos = sorted({c.file for c in self.crops})
        return {
            "resolution": [self.resolution, self.resolution],
            "channels": 3,
            "photos": photos,
            "notes": "random square crops (side 2R or 4R) of scikit-image's bundled photographs, bicubic "
            "resize to R; train and test use disjoint photos; no labels",
        }

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        r = self.resolution
        for c in self.crops[start:stop]:
            img = load_photo(c.file).crop(c.box).resize((r, r), RESAMPLE)
            yield Sample(key=c.key, png=encode_png(to_array(img)))


def sample_sources(opts: SampleOptions) -> list[SampleSplit]:
    counts = {"train": opts.n_train, "test": opts.n_test}
    out = []
    for split in opts.splits:
        if split not in counts:
            raise ValueError(f"unknown split {split!r} for sample (train, test)")
        crops = plan_crops(split, counts[split], opts.resolution, opts.seed)
        out.append(SampleSplit(split=split, resolution=opts.resolution, seed=opts.seed, crops=crops))
    return out


def ensure_sample_shards(
    out_dir: str | Path,
    resolution: int = 32,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_COUNTS["train"],
    n_test: int = DEFAULT_COUNTS["test"],
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    progress: bool = False,
    png_level: int = DEFAULT_PNG_LEVEL,
) -> Path:
    """Build the sample set into `out_dir/{train,test}/` unless a valid identical build is there.

    Valid means: complete manifests for this exact config and every shard's sha256 matching.
    Missing or corrupt shards that a sample manifest or progress record names are rebuilt; a sample
    build with other settings is replaced (it is derived data). Anything else in `out_dir`, such as
    shards with no manifest, files of the user's, or shards of another dataset, is a ValueError
    naming the folder, and nothing is touched: the training pipeline calls this with `data.root`,
    which may point at a folder that holds real data. Safe to call from several processes at once.
    Returns the folder holding `train/` and `test/`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = SampleOptions(resolution=resolution, n_train=n_train, n_test=n_test, seed=seed)
    command = (
        f"data_prep.ensure_sample_shards({str(out)!r}, resolution={resolution}, seed={seed}, "
        f"n_train={n_train}, n_test={n_test}, shard_size={shard_size})",
    )
    run = RunOptions(
        output=out,
        shard_size=shard_size,
        workers=workers,
        seed=seed,
        command=command,
        progress=progress,
        png_level=png_level,
    )
    refuse_foreign_content(out)  # before the lock file: a refused folder gets nothing of ours
    with locked(out / SAMPLE_LOCK_NAME, output_id(out)):
        refuse_foreign_content(out)  # again, now that no other builder is writing
        for source in sample_sources(opts):
            try:
                convert_split(source, run)
            except ConfigMismatch:
                # The sample set is a cache of derived data: a build with other settings (or from an
                # older data_prep) is replaced. Shards of any other dataset are never touched.
                if not _holds_only_sample_builds(out):
                    raise
                print(f"{out}: replacing a sample build made with other settings", file=sys.stderr)
                convert_split(source, dataclasses.replace(run, overwrite=True))
    return out


def refuse_foreign_content(out: Path) -> None:
    """ValueError naming the folder unless `out` holds nothing but (parts of) data_prep builds."""
    splits = {"train", "test"}
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in (SAMPLE_LOCK_NAME, OUTPUT_RECORD) and not (p.name in splits and p.is_dir())
    )
    if foreign:
        raise ValueError(
            f"{out} holds {name_list(foreign)} besides train/ and test/; the sample set is built only "
            "into an empty folder or over its own earlier build: choose another folder (data.root "
            "for training)"
        )
    for split in sorted(splits):
        split_dir = out / split
        if not split_dir.is_dir():
            continue
        foreign = foreign_entries(split_dir)
        if foreign:
            raise ValueError(
                f"{split_dir} holds files that no {MANIFEST_NAME} or {PROGRESS_NAME} names "
                f"({name_list(foreign)}); the sample set never deletes or writes next to files it "
                f"did not record: choose another folder (data.root for training), or, if they are "
                f"a sample build whose {MANIFEST_NAME} was lost, delete {split_dir} yourself"
            )


def _holds_only_sample_builds(out: Path) -> bool:
    records = [p / n for p in out.iterdir() if p.is_dir() for n in (MANIFEST_NAME, PROGRESS_NAME)]
    for path in records:
        if path.exists():
            try:
                source = (recorded_dataset(load_json(path)) or {}).get("source")
            except ValueError:
                return False
            if source != "sample":
                return False
    return True


def _add_options(parser) -> None:
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=32)
    parser.add_argument("--n-train", type=int, default=DEFAULT_COUNTS["train"])
    parser.add_argument("--n-test", type=int, default=DEFAULT_COUNTS["test"])


def _build(args) -> list[SampleSplit]:
    return sample_sources(
        SampleOptions(
            resolution=args.resolution,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            splits=args.splits,
        )
    )


SOURCE = Source(
    name="sample",
    help="built-in crops of scikit-image's bundled photographs",
    description="Real photographs shipped with scikit-image, cut into crops; train and "
    "test come from disjoint photos. Needs no --input.",
    add_options=_add_options,
    build=_build,
    needs_input=False,
    shard_size=DEFAULT_SHARD_SIZE,
)
