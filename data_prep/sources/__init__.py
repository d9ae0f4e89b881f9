"""The table of dataset sources: one module per on-disk layout, each contributing one `Source` entry.

A source module defines `SOURCE = Source(...)`: its subcommand name, help and description, a hook
that adds its own CLI options, and a builder that turns the parsed arguments into `SplitSource`s.
`data_prep/cli.py` reads `source_table()` to build its subcommands and to dispatch, so adding a
source means writing its module and listing it in `MODULES`, nothing else.

The modules are imported when the table is asked for, not when this package is: the training
pipeline imports `data_prep.sources.sample` alone and should not pay for lmdb and friends.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from data_prep.convert import SplitSource

# Subcommand order in `python -m data_prep --help`.
MODULES = ("imagenet", "lsun", "cifar10", "folder", "sample")
DEFAULT_SHARD_SIZE = 10_000


@dataclass(frozen=True, kw_only=True)
class Source:
    """One CLI subcommand: `python -m data_prep <name> --input ... --output ... [options]`."""

    name: str
    help: str  # one line in `python -m data_prep --help`
    description: str  # the layout it reads, in `python -m data_prep <name> --help`
    # Adds the options only this source has (the shared ones, --input/--output/..., come from the CLI).
    add_options: Callable[[argparse.ArgumentParser], None]
    # Parsed arguments (shared and own) -> the splits to convert; ValueError for a user mistake.
    build: Callable[[argparse.Namespace], list[SplitSource]]
    needs_input: bool = True  # False: builds from data shipped with a package (sample)
    shard_size: int = DEFAULT_SHARD_SIZE  # default of --shard-size


def source_table() -> dict[str, Source]:
    """name -> Source for every module in MODULES, in that order."""
    table: dict[str, Source] = {}
    for module_name in MODULES:
        entry = importlib.import_module(f"data_prep.sources.{module_name}").SOURCE
        assert isinstance(entry, Source) and entry.name not in table, module_name
        table[entry.name] = entry
    return table
