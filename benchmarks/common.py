"""Setup shared by the benchmark scripts, each run from the repository root as
``python -m benchmarks.<name>`` (so ``flows``, ``pipeline`` and this package import without any
``sys.path`` edits).

torch is imported inside the functions, not at module level: ``pin_openmp_threads`` must run before
the first ``import torch`` of the process, because OpenMP reads ``OMP_NUM_THREADS`` once, at start-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pin_openmp_threads(module: str, default: int = 1) -> None:
    """Re-run this module with ``OMP_NUM_THREADS`` set to its ``--threads`` unless already set.

    Ray starts its workers with OMP_NUM_THREADS set to their CPU count; a benchmark that compares
    against Ray gives its own process the same OpenMP start-up, or it measures OpenMP's idle threads.
    ``module`` is the caller's ``__spec__.name`` (``benchmarks.train``), run again with ``-m``.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=default)
    os.environ["OMP_NUM_THREADS"] = str(max(1, pre.parse_known_args()[0].threads))
    os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def set_cpu_threads(threads: int | None, device: str = "cpu") -> None:
    """``torch.set_num_threads(threads)`` on the CPU; a GPU run and ``threads=None`` keep torch's default."""
    import torch

    if threads and str(device).startswith("cpu"):
        torch.set_num_threads(threads)


def module_command(module: str, argv: list[str]) -> list[str]:
    """The command line that runs ``python -m module argv`` with this interpreter."""
    return [sys.executable, "-m", module, *argv]


def child_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, so a child started with
    ``-m benchmarks.<name>`` imports the same packages from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(module: str, argv: list[str]) -> dict[str, float]:
    """Run ``python -m module argv`` in a fresh process; its last stdout line is a JSON dict of results.

    A fresh process per measurement because a process's peak RSS never shrinks back.
    """
    out = subprocess.run(
        module_command(module, argv), check=True, capture_output=True, text=True, env=child_env()
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def forward_options(args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """``--key value`` for each of ``keys`` that is set in ``args`` (a child's share of the options)."""
    argv: list[str] = []
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def setup_line(args: argparse.Namespace, **extra: object) -> str:
    """The first line of a benchmark's output: device, torch version, threads, then ``extra``."""
    import torch

    words = [f"device={args.device}", f"torch={torch.__version__}", f"threads={torch.get_num_threads()}"]
    return " ".join(words + [f"{k}={v}" for k, v in extra.items()])


def table_header(*columns: str) -> None:
    """A Markdown table's header and separator lines; the rows follow as ``table_row`` prints them."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def table_row(*cells: object) -> None:
    """One Markdown table row, flushed (a long benchmark shows each row as it is measured)."""
    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


@functools.cache
def _pictures() -> list:
    import torch

    try:
        from skimage import data as skdata
    except ImportError:
        return []
    return [
        torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).contiguous()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    ]


def photos(n: int, size: int, seed: int):
    """Test images with natural-image statistics: uint8 (n, 3, size, size), random size x size crops
    of scikit-image's bundled photographs, or uniform noise where scikit-image is not installed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pictures = _pictures()
    if not pictures:
        return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    out = []
    for _ in range(n):
        pic = pictures[int(torch.randint(len(pictures), (1,), generator=g))][:3]
        top = int(torch.randint(pic.shape[1] - size, (1,), generator=g))
        left = int(torch.randint(pic.shape[2] - size, (1,), generator=g))
        out.append(pic[:, top : top + size, left : left + size])
    return torch.stack(out)
