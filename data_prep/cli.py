"""`python -m data_prep <source> --input ... --output ...`, `python -m data_prep verify DIR` and
`python -m data_prep upload DIR URI`.

`--output` may be an object-storage URI (`s3://bucket/prefix`, credentials and endpoint from the
environment as for every AWS client): the shards are converted into a local staging folder
(`--staging`, default under the temp dir, keyed by the URI, so an interrupted run resumes), then
uploaded and checked by data_prep/upload.py (manifest last), and the staging folder is removed.

User mistakes (bad paths, corrupt inputs, a mismatched output folder) surface as ValueError, and
the machine's complaints (disk full, an output path under a file, no permission) as OSError; both
become one `error: ...` line and exit code 2. A passing verify exits 0, a failing one 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_prep.convert import RunOptions, convert_split
from data_prep.images import DEFAULT_PNG_LEVEL
from data_prep.sources import DEFAULT_SHARD_SIZE, source_table
from data_prep.storage import is_uri

SPLITS = ("train", "test")


def _splits(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SPLITS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"splits must be a comma list of {SPLITS}, got {text!r}")
    return parts


def _common(
    p: argparse.ArgumentParser, *, shard_size: int = DEFAULT_SHARD_SIZE, needs_input: bool = True
) -> None:
    """The options every converter shares."""
    if needs_input:
        p.add_argument("--input", type=Path, required=True, help="root of the official on-disk layout")
    p.add_argument(
        "--output",
        type=_output,
        required=True,
        help="writes OUTPUT/{train,test}/*.tar + manifest.json; a folder or s3://bucket/prefix",
    )
    p.add_argument(
        "--staging",
        type=Path,
        default=None,
        help="with an object-storage --output: the local folder to convert into before uploading",
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


def _output(text: str) -> str | Path:
    return text.rstrip("/") if is_uri(text) else Path(text)


def default_staging(uri: str) -> Path:
    """The local folder an upload to ``uri`` converts into (the same for a re-run, which resumes)."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "eiw-data-prep-staging" / key


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of the source table, plus `verify`."""
    table = source_table()
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description="Convert image datasets to WebDataset shards; verify shards."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join([*table, "verify"]) + "}"
    )
    for source in table.values():
        p = sub.add_parser(source.name, help=source.help, description=source.description)
        _common(p, shard_size=source.shard_size, needs_input=source.needs_input)
        source.add_options(p)

    p = sub.add_parser(
        "verify",
        help="re-hash, count and decode every sample of a converted dataset",
        description="DIR is a split folder (with manifest.json) or its parent, local or in object "
        "storage (s3://bucket/prefix, credentials from the environment). Exit 1 on any problem, "
        "listed by shard and key.",
    )
    p.add_argument("dir")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))

    p = sub.add_parser(
        "upload",
        help="copy converted shards to object storage and check them there",
        description="DIR is a split folder (with manifest.json) or its parent; URI the destination "
        "(s3://bucket/prefix; a split goes to URI/<split>). Local shards are checked against the "
        "manifest, each upload is read back (sha256) and the manifest goes up last.",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("uri")
    p.add_argument("--no-verify", action="store_true", help="check uploaded sizes only, not sha256")
    return parser


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
        if args.command == "upload":
            from data_prep.upload import upload_dataset

            if not is_uri(args.uri):
                raise ValueError(f"{args.uri}: not an object-storage URI (scheme://bucket/prefix)")
            for uri in upload_dataset(args.dir, args.uri.rstrip("/"), verify=not args.no_verify):
                print(f"{uri}: uploaded and checked", file=sys.stderr)
            return 0
        remote = is_uri(args.output)
        local_out = (args.staging or default_staging(args.output)) if remote else args.output
        opts = RunOptions(
            output=local_out,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            seed=args.seed,
            command=("python", "-m", "data_prep", *argv),
            progress=not args.no_progress,
            png_level=args.png_level,
        )
        for source in source_table()[args.command].build(args):
            m = convert_split(source, opts)
            if remote:
                from data_prep.upload import upload_split

                upload_split(local_out / source.split, f"{args.output}/{source.split}")
            print(
                f"{args.output}/{source.split}: {m['total']} samples in {len(m['shards'])} shards"
                + (f", {m['skipped_count']} skipped" if m["skipped_count"] else ""),
                file=sys.stderr,
            )
        if remote and args.staging is None:
            shutil.rmtree(local_out, ignore_errors=True)  # uploaded and checked: ours to remove
    except (ValueError, OSError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def error_line(exc: ValueError | OSError) -> str:
    """One line naming the file: OS errors (a full disk, an output path under a file, no permission)
    are the user's to fix, like bad input, and get the same one-line treatment, not a traceback."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
        if exc.filename2 is not None:
            text += f" (-> {exc.filename2})"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the message held
