"""Rank 0's console during a run: a tqdm progress bar on a terminal (or with ``run.progress_bar: true``)
and the project's log lines (written through the bar so that they do not tear it)."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.runtime import Runtime

log = logging.getLogger("pipeline.loop")  # the loop's lines, as before the console had its own file


class Console:
    """Rank 0's progress: a tqdm bar on a terminal (or with ``run.progress_bar: true``), log lines."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, *, initial: int) -> None:
        self.is_main = runtime.is_main
        wanted = cfg.run.progress_bar is True or (cfg.run.progress_bar == "auto" and sys.stderr.isatty())
        self.bar = tqdm(
            total=cfg.total_steps, initial=initial, disable=not (self.is_main and wanted), unit="step",
            dynamic_ncols=True,
        )  # fmt: skip

    def advance(self) -> None:
        self.bar.update(1)

    def say(self, text: str) -> None:
        if self.is_main:
            (log.info if self.bar.disable else self.bar.write)(text)

    def close(self) -> None:
        self.bar.close()
