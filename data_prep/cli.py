"""`python -m data_prep <source> --input ... --output ...` and `python -m data_prep verify DIR`.

User mistakes (bad paths, corrupt inputs, a mismatched output folder) surface as ValueError and
become one `error: ...` line and exit code 2; a passing verify exits 0, a failing one 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.convert import RunOptions, convert_split
from data_prep.images import DEFAULT_PNG_LEVEL

SPLITS = ("train", "test")


def _splits(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SPLITS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"splits must be a comma list of {SPLITS}, got {text!r}")
    return parts


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--crop-box wants left,top,right,bottom integers, got {text!r}")
    return box  # type: ignore[return-value]


def _common(p: argparse.ArgumentParser, *, shard_size: int = 10_000, needs_input: bool = True) -> None:
    if needs_input:
        p.add_argument("--input", type=Path, required=True, help="root of the official on-disk layout")
    p.add_argument(
        "--output", type=Path, required=True, help="writes OUTPUT/{train,test}/*.tar + manifest.json"
    )
    p.add_argument("--splits", type=_splits, default=SPLITS, help="comma list of train,test (default both)")
    p.add_argument(
        "--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes (default min(4, cores))",
    )
    p.add_argument("--seed", type=int, default=0, help="recorded in the manifest; drives the sample crops")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of another dataset/config in OUTPUT instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--png-level",
        type=int,
        choices=range(10),
        default=DEFAULT_PNG_LEVEL,
        metavar="0..9",
        help="PNG zlib level (default 0: ~2x the bytes of 1, ~1.7x faster to decode)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description="Convert image datasets to WebDataset shards; verify shards."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{imagenet,lsun,cifar10,folder,sample,verify}"
    )

    p = sub.add_parser(
        "imagenet",
        help="downsampled ImageNet npz release (64x64, 32x32)",
        description="Imagenet64_train_part{1,2}_npz/train_data_batch_*.npz and Imagenet64_val_npz/"
        "val_data.npz (or the Imagenet32 equivalents); val becomes the test split; "
        "labels stored 0-based.",
    )
    _common(p)
    p.add_argument(
        "--resolution",
        type=int,
        choices=(8, 16, 32, 64),
        default=None,
        help="which release when --input holds several (default: inferred)",
    )

    p = sub.add_parser(
        "lsun",
        help="LSUN category lmdbs",
        description="{category}_train_lmdb -> train, {category}_val_lmdb -> test. Undecodable "
        "values are skipped and listed in the manifest.",
    )
    _common(p)
    p.add_argument(
        "--categories",
        default=None,
        help="comma list, e.g. bedroom,church_outdoor (default: every *_train_lmdb); cls = index",
    )
    p.add_argument("--resolution", type=int, choices=(64, 128), default=64)
    p.add_argument(
        "--protocol",
        choices=("center", "glow"),
        default="center",
        help="center: shorter side to R, central crop. glow: shorter side to 1.5R, store the "
        "central 1.5R square (96 for 64) for random R crops at train time",
    )

    p = sub.add_parser(
        "cifar10",
        help="CIFAR-10 python batches",
        description="cifar-10-batches-py/data_batch_1..5 -> train, test_batch -> test.",
    )
    _common(p)

    p = sub.add_parser(
        "folder",
        help="any folder of images (e.g. CelebA img_align_celeba)",
        description="Recursive; split by a hash of the relative path; no labels.",
    )
    _common(p)
    p.add_argument("--crop-box", type=_box, default=None, help="left,top,right,bottom crop applied first")
    p.add_argument(
        "--size", type=int, default=None, help="shorter side to SIZE, then central SIZE x SIZE crop"
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.05, help="fraction of files in test (default 0.05)"
    )

    from data_prep.sources.sample import DEFAULT_COUNTS, DEFAULT_SHARD_SIZE

    p = sub.add_parser(
        "sample",
        help="built-in crops of scikit-image's bundled photographs",
        description="Real photographs shipped with scikit-image, cut into crops; train and "
        "test come from disjoint photos. Needs no --input.",
    )
    _common(p, shard_size=DEFAULT_SHARD_SIZE, needs_input=False)
    p.add_argument("--resolution", type=int, choices=(32, 64), default=32)
    p.add_argument("--n-train", type=int, default=DEFAULT_COUNTS["train"])
    p.add_argument("--n-test", type=int, default=DEFAULT_COUNTS["test"])

    p = sub.add_parser(
        "verify",
        help="re-hash, count and decode every sample of a converted dataset",
        description="DIR is a split folder (with manifest.json) or its parent. Exit 1 on any "
        "problem, listed by shard and key.",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    return parser


def _sources(args: argparse.Namespace) -> list:
    if args.command == "imagenet":
        from data_prep.sources.imagenet import ImagenetOptions, imagenet_sources

        return imagenet_sources(
            ImagenetOptions(input=args.input, resolution=args.resolution, splits=args.splits)
        )
    if args.command == "lsun":
        from data_prep.sources.lsun import LsunOptions, lsun_sources

        cats = tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else None
        return lsun_sources(
            LsunOptions(
                input=args.input,
                categories=cats,
                resolution=args.resolution,
                protocol=args.protocol,
                splits=args.splits,
            )
        )
    if args.command == "cifar10":
        from data_prep.sources.cifar10 import Cifar10Options, cifar10_sources

        return cifar10_sources(Cifar10Options(input=args.input, splits=args.splits))
    if args.command == "folder":
        from data_prep.sources.folder import FolderOptions, folder_sources

        return folder_sources(
            FolderOptions(
                input=args.input,
                crop_box=args.crop_box,
                size=args.size,
                test_fraction=args.test_fraction,
                splits=args.splits,
            )
        )
    if args.command == "sample":
        from data_prep.sources.sample import SampleOptions, sample_sources

        return sample_sources(
            SampleOptions(
                resolution=args.resolution,
                n_train=args.n_train,
                n_test=args.n_test,
                seed=args.seed,
                splits=args.splits,
            )
        )
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 verify found problems, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":
            from data_prep.verify import print_report, verify_path

            problems = verify_path(args.dir, workers=args.workers)
            print_report(args.dir, problems)
            return 1 if problems else 0
        opts = RunOptions(
            output=args.output,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            seed=args.seed,
            command=("python", "-m", "data_prep", *argv),
            progress=not args.no_progress,
            png_level=args.png_level,
        )
        for source in _sources(args):
            m = convert_split(source, opts)
            print(
                f"{args.output / source.split}: {m['total']} samples in {len(m['shards'])} shards"
                + (f", {m['skipped_count']} skipped" if m["skipped_count"] else ""),
                file=sys.stderr,
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
