"""Per-checkpoint stall of the training loop: writing in the training thread (before) against the
background writer (after), in one run. Called by ``python -m benchmarks.train --checkpoint-stall``.

Both halves run the plain loop's pieces on the same model and batches: ``train_step`` for every step
and, every ``--checkpoint-every`` steps, ``TrainState.save(runtime, state.snapshot(runtime))`` on a
``LocalRuntime`` whose checkpoints go to ``--storage`` (a local temporary folder by default, or an
object-storage URI). The stall is the wall time that call keeps the training loop from its next step:
before, serialising, fsync, rename (or upload) and retention; after, the CPU copy of the state plus any
wait for the previous write still in flight. Steps that ran while a write was in flight are timed
apart from the others: on a machine with few cores the writer competes with training for CPU, and
the net cost column adds that slowdown (summed over the steps beside a write, per checkpoint) to the
stall.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from flows import initialize_actnorm
from pipeline.checkpoint import STATE_FILE, list_checkpoints
from pipeline.config import TrainConfig
from pipeline.runtime import LocalRuntime
from pipeline.step import TrainingObjective, train_step
from pipeline.train_state import TrainState


def _run(cfg: TrainConfig, batches: list[torch.Tensor], directory: str, *, background: bool, steps: int,
         every: int, warmup: int) -> dict:  # fmt: skip
    torch.manual_seed(0)
    device = batches[0].device
    runtime = LocalRuntime(directory, num_to_keep=2, device=device, background=background)
    state = TrainState(cfg, device)
    initialize_actnorm(state.flow, batches[0])
    objective = TrainingObjective(state.flow)
    stalls: list[float] = []
    busy_steps: list[float] = []
    idle_steps: list[float] = []
    for i in range(warmup + steps):
        state.flow.advance(state.step)
        busy = runtime.writer.busy
        start = time.perf_counter()
        result = train_step(objective, batches[i % len(batches)], state.optimizer, state.scheduler,
                            cfg=cfg, runtime=runtime)  # fmt: skip
        result.skipped.item()  # train_step reads nothing back: synchronise the device for the clock
        took = time.perf_counter() - start
        state.count(result)
        if i >= warmup:
            (busy_steps if busy else idle_steps).append(took)
            if (i - warmup + 1) % every == 0:
                start = time.perf_counter()
                state.save(runtime, state.snapshot(runtime), metrics={})
                stalls.append(time.perf_counter() - start)
    start = time.perf_counter()
    runtime.flush_checkpoints()
    last_flush = time.perf_counter() - start
    latest = list_checkpoints(directory)[-1]
    size = (latest / STATE_FILE).stat().st_size if isinstance(latest, Path) else (latest / STATE_FILE).size()
    return {"stalls": stalls, "busy": busy_steps, "idle": idle_steps, "last_flush": last_flush,
            "mib": size / 2**20}  # fmt: skip


def run(cfg: TrainConfig, batches: list[torch.Tensor], *, storage: str | None, steps: int, every: int,
        warmup: int, rounds: int) -> int:  # fmt: skip
    """Alternate sync and background rounds (machine load drifts); print one table with the ratio."""
    med = statistics.median
    results: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for r in range(rounds):
            for background in (False, True):
                base = storage.rstrip("/") if storage else tmp
                directory = f"{base}/stall-{uuid.uuid4().hex[:8]}-r{r}-{'bg' if background else 'sync'}"
                results[background].append(_run(cfg, batches, directory, background=background,
                                                steps=steps, every=every, warmup=warmup))  # fmt: skip

    def merged(background: bool, key: str) -> list[float]:
        return [v for res in results[background] for v in res[key]]

    mib = results[False][0]["mib"]
    where = storage or "a local temporary folder (fsync)"
    print(f"\ncheckpoint stall: state.pt {mib:.1f} MiB to {where}, a checkpoint every {every} steps, "
          f"{len(merged(False, 'stalls'))} checkpoints per mode over {rounds} round(s)")  # fmt: skip
    print("\n| checkpoint write | stall per checkpoint ms (median) | max | step ms, writer idle | "
          "step ms, write in flight | net cost per checkpoint ms | final flush ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for background, name in ((False, "in the training thread (before)"), (True, "background writer (after)")):
        stalls = merged(background, "stalls")
        idle, busy = merged(background, "idle"), merged(background, "busy")
        flush = med(res["last_flush"] for res in results[background])
        rows[background] = med(stalls)
        busy_text = f"{med(busy) * 1e3:.1f} ({len(busy)} steps)" if busy else "-"
        # What a checkpoint costs the run in all: the stall plus the slowdown of the steps that ran
        # beside the write (the writer's CPU, on a machine with few cores), against the idle median.
        slowdown = sum(t - med(idle) for t in busy) / len(stalls)
        net = med(stalls) + slowdown
        print(f"| {name} | {med(stalls) * 1e3:.1f} | {max(stalls) * 1e3:.1f} | {med(idle) * 1e3:.1f} | "
              f"{busy_text} | {net * 1e3:.1f} | {flush * 1e3:.1f} |")  # fmt: skip
    print(f"\nstall ratio, before / after: {rows[False] / rows[True]:.1f}x "
          f"({rows[False] * 1e3:.1f} ms -> {rows[True] * 1e3:.1f} ms per checkpoint)")
    return 0
