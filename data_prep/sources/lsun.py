"""LSUN scene categories: one lmdb per category and split (`bedroom_train_lmdb`, `church_outdoor_val_lmdb`).

Key = 40-hex image id, value = encoded bytes (the official exporter writes webp; older dumps hold
jpeg), shorter side 256. Output `train` <- `*_train_lmdb`, `test` <- `*_val_lmdb`; `cls` is the
category's index in the order given by --categories (listed in the manifest's `classes`).

Protocols (resolution R = 64 or 128):
- `center`: shorter side to R (PIL bicubic), central R x R crop. Stored R x R.
- `glow`: the RealNVP/Glow LSUN protocol: shorter side to 1.5 R (96 for 64), central 1.5R square
  stored as is; training takes random R x R crops of it (manifest `train_crop: R`), evaluation
  the central R x R crop.
An undecodable value is skipped and its key listed in the manifest (LSUN has a few broken images);
a decodable image of an unexpected mode stops the conversion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from data_prep.convert import SplitSource
from data_prep.images import (
    UndecodableImage,
    decode_bytes,
    encode_png,
    shorter_side_center_crop,
    to_array,
    to_rgb,
)
from data_prep.sources import Source
from data_prep.writer import Sample, Skipped

PROTOCOLS = ("center", "glow")
RESOLUTIONS = (64, 128)
SOURCE_SPLIT = {"train": "train", "test": "val"}
_SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]+$")
_envs: dict[str, lmdb.Environment] = {}


@dataclass(frozen=True, kw_only=True)
class LsunOptions:
    input: Path
    categories: tuple[str, ...] | None = None  # None: every category with a train lmdb, sorted
    resolution: int = 64
    protocol: str = "center"
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"--resolution must be one of {RESOLUTIONS}, got {self.resolution}")


def open_env(path: Path) -> lmdb.Environment:
    """One read-only environment per process (lmdb handles must not cross a fork)."""
    key = str(path)
    if key not in _envs:
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise ValueError(f"{path}: cannot open as lmdb ({exc})") from exc
        try:
            _check_file_size(path, env)
        except ValueError:
            env.close()
            raise
        _envs[key] = env
    return _envs[key]


def _check_file_size(path: Path, env: lmdb.Environment) -> None:
    """The pages the lmdb's meta page says are in use must be in the file: lmdb maps the file and
    reads pages in place, so a page past the end of a truncated file is a SIGBUS (the process dies
    with no message), not an error it could report."""
    data = Path(path) / "data.mdb" if Path(path).is_dir() else Path(path)
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = data.stat().st_size
    if have < needed:
        raise ValueError(
            f"{path}: truncated lmdb ({data.name} holds {have} bytes, its meta page says {needed} are in "
            "use); copy it again"
        )


@contextlib.contextmanager
def reading(path: Path):
    """A damaged lmdb (lmdb.CorruptedError, ...) is bad input: a ValueError naming it, not a traceback."""
    try:
        yield
    except lmdb.Error as exc:
        raise ValueError(f"{path}: cannot read lmdb ({type(exc).__name__}: {exc})") from exc


def close_envs() -> None:
    for env in _envs.values():
        env.close()
    _envs.clear()


def safe_key(raw: bytes) -> str:
    """The lmdb key as the sample key; anything not [0-9A-Za-z_-] (webdataset splits at dots) -> hex."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.hex()
    return text if _SAFE_KEY.match(text) else raw.hex()


@dataclass(frozen=True, kw_only=True)
class LsunDb:
    path: Path
    category: str
    label: int
    entries: int


@dataclass(frozen=True, kw_only=True)
class LsunSplit(SplitSource):
    split: str
    dbs: tuple[LsunDb, ...]
    categories: tuple[str, ...]
    resolution: int
    protocol: str
    # position -> (db index, lmdb key) at every shard start, so a worker can jump there directly
    starts: tuple[tuple[int, int, bytes], ...] = ()

    @property
    def stored(self) -> int:
        return self.resolution * 3 // 2 if self.protocol == "glow" else self.resolution

    def __len__(self) -> int:
        return sum(db.entries for db in self.dbs)

    def dataset_config(self) -> dict:
        return {
            "source": "lsun",
            "categories": list(self.categories),
            "resolution": self.resolution,
            "protocol": self.protocol,
        }

    def inputs(self) -> list:
        return [[db.path.name, db.entries] for db in self.dbs]

    def manifest_fields(self) -> dict:
        fields = {
            "resolution": [self.stored, self.stored],
            "channels": 3,
            "label_offset": 0,
            "classes": list(self.categories),
            "protocol": self.protocol,
            "source_split": SOURCE_SPLIT[self.split],
        }
        if self.protocol == "glow":
            fields["train_crop"] = self.resolution
            fields["notes"] = (
                f"glow protocol: shorter side to {self.stored} (bicubic), central "
                f"{self.stored}x{self.stored} stored; train on random {self.resolution}x"
                f"{self.resolution} crops, evaluate on the central crop"
            )
        else:
            fields["notes"] = f"center protocol: shorter side to {self.resolution} (bicubic), central crop"
        return fields

    def plan(self, shard_size: int) -> LsunSplit:
        """Scan keys once (no values) to find the key at every shard start."""
        starts, pos = [], 0
        for d, db in enumerate(self.dbs):
            with reading(db.path), open_env(db.path).begin() as txn:
                for i, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
                    if (pos + i) % shard_size == 0:
                        starts.append((pos + i, d, bytes(key)))
            pos += db.entries
        close_envs()
        return dataclasses.replace(self, starts=tuple(starts))

    def iter_range(self, start: int, stop: int) -> Iterator[Sample | Skipped]:
        table = {p: (d, k) for p, d, k in self.starts}
        assert start in table, "ranges start at shard boundaries, which plan() recorded"
        d, first_key = table[start]
        remaining = stop - start
        while remaining > 0:
            db = self.dbs[d]
            with reading(db.path), open_env(db.path).begin() as txn:
                cur = txn.cursor()
                ok = cur.set_key(first_key) if first_key is not None else cur.first()
                assert ok, f"{db.path}: key vanished since the scan"
                for raw_key, value in cur:
                    yield self._convert(db, bytes(raw_key), bytes(value))
                    remaining -= 1
                    if remaining == 0:
                        return
            d, first_key = d + 1, None

    def _convert(self, db: LsunDb, raw_key: bytes, value: bytes) -> Sample | Skipped:
        key = f"{db.category}_{safe_key(raw_key)}"
        name = f"{db.path.name} key {raw_key.decode('ascii', 'replace')}"
        try:
            img = decode_bytes(value, name=name)
        except UndecodableImage as exc:
            return Skipped(key=key, reason=str(exc))
        img = shorter_side_center_crop(to_rgb(img, name=name), self.stored)
        return Sample(key=key, png=encode_png(to_array(img)), label=db.label)


def lsun_sources(opts: LsunOptions) -> list[LsunSplit]:
    root = Path(opts.input)
    if not root.is_dir():
        raise ValueError(f"--input {root} is not a directory")
    categories = opts.categories
    if categories is None:
        categories = tuple(
            sorted(p.name[: -len("_train_lmdb")] for p in root.glob("*_train_lmdb") if p.is_dir())
        )
        if not categories:
            raise ValueError(f"no *_train_lmdb folders in {root}; pass --categories")
    out = []
    for split in opts.splits:
        if split not in SOURCE_SPLIT:
            raise ValueError(f"unknown split {split!r} for lsun (train, test)")
        dbs = []
        for label, cat in enumerate(categories):
            path = root / f"{cat}_{SOURCE_SPLIT[split]}_lmdb"
            if not path.is_dir():
                raise ValueError(f"missing {path} (category {cat!r}, split {split!r})")
            entries = open_env(path).stat()["entries"]
            dbs.append(LsunDb(path=path, category=cat, label=label, entries=entries))
        out.append(
            LsunSplit(
                split=split,
                dbs=tuple(dbs),
                categories=tuple(categories),
                resolution=opts.resolution,
                protocol=opts.protocol,
            )
        )
    close_envs()
    return out


def _add_options(parser) -> None:
    parser.add_argument(
        "--categories",
        default=None,
        help="comma list, e.g. bedroom,church_outdoor (default: every *_train_lmdb); cls = index",
    )
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=64)
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="center",
        help="center: shorter side to R, central crop. glow: shorter side to 1.5R, store the "
        "central 1.5R square (96 for 64) for random R crops at train time",
    )


def _build(args) -> list[LsunSplit]:
    categories = None
    if args.categories:
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    return lsun_sources(
        LsunOptions(
            input=args.input,
            categories=categories,
            resolution=args.resolution,
            protocol=args.protocol,
            splits=args.splits,
        )
    )


SOURCE = Source(
    name="lsun",
    help="LSUN category lmdbs",
    description="{category}_train_lmdb -> train, {category}_val_lmdb -> test. Undecodable "
    "values are skipped and listed in the manifest.",
    add_options=_add_options,
    build=_build,
)
