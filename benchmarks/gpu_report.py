"""benchmarks/gpu.py's result rows and their markdown table (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Row:
    model: str
    depth: str
    mode: str
    compiled: bool = False
    images_per_s: float = math.nan
    step_ms: float = math.nan
    tflops: float = math.nan
    peak_gib: float = math.nan
    compile_s: float = math.nan
    nonfinite: int = 0
    bpd: float = math.nan
    bpd_delta: float = math.nan
    bpd_max_abs: float = math.nan
    largest_batch: str = "-"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | depth | precision | compiled | images/s | step ms | TFLOP/s | peak GiB | compile s "
        "| non-finite | bits/dim | vs fp32 (mean) | max abs per image | within 1e-3 | largest batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        within = "-"
        if row.mode != "fp32" and not math.isnan(row.bpd_delta):
            within = "yes" if abs(row.bpd_delta) <= 1e-3 else "no"
        cells = [
            row.model, row.depth, row.mode, "yes" if row.compiled else "no",
            _number(row.images_per_s, ".1f"), _number(row.step_ms, ".1f"), _number(row.tflops, ".2f"),
            _number(row.peak_gib, ".2f"), _number(row.compile_s, ".0f"), str(row.nonfinite),
            _number(row.bpd, ".5f"), _number(row.bpd_delta, "+.2e"), _number(row.bpd_max_abs, ".2e"),
            within, row.largest_batch,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)
