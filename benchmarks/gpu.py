"""One GPU, torch alone: what a cluster user needs before booking nodes, for both recipe models.

    python -m benchmarks.gpu                          # CUDA device 0: about 6 minutes on one H200
    python -m benchmarks.gpu --shards /shared/data/imagenet64   # feed the steps real images
    python -m benchmarks.gpu --device cpu --quick     # every code path at tiny sizes (no GPU numbers)

Run from the repository root of a plain checkout: it imports torch, ``flows`` and its two siblings
(``benchmarks.gpu_inputs``, ``benchmarks.gpu_report``) and nothing else, not even benchmarks/common.py.

Models: configs/imagenet64.yaml's Glow (4 levels, 512 hidden channels, EIW split) and
configs/imagenet64_denseflow.yaml's DenseFlow (DF_74_10, variational dequantization, EIW split), each
at reduced depth (Glow: ``--steps-per-level`` 8 of 48; DenseFlow: layers 1 1 4 of 5 6 20) for the
precision and compile comparison, and at full depth for speed, the largest batch and FLOPs.

One training step is what pipeline/step.py does: ``model.advance(step)``, under the precision's
autocast the objective (flows/objective.py ``training_loss``: mean bits/dim plus sigma times the regulariser,
in float32), backward, gradient clipping, an Adamax step. ``compiled`` rows wrap the objective in
``torch.compile`` (``--compile-backend``, default inductor; the compile time is a column). Precisions:

- ``fp32``: float32 with TF32 off for convolutions and matmuls (IEEE float32, the reference).
- ``tf32``: float32 with TF32 on for both.
- ``bf16``: bf16 autocast with torch's default float32 settings: what ``run.precision: auto`` trains
  with on a GPU (the model keeps its numerically sensitive parts in float32, docs/model.md).

Measurements, written as a markdown table (``--out``.md) and JSON (``--out``.json):

1. images/s, ms per step and peak memory (``torch.cuda.max_memory_allocated``) at ``--batch`` images
   per step, each configuration on a fresh model; achieved TFLOP/s from the counted FLOPs.
2. bits/dim of one fixed batch after ``--train-steps`` fp32 steps, per precision: the difference to
   fp32 is the error a precision adds to the likelihood (goal for bf16: within 1e-3 bits/dim).
3. the largest per-GPU batch of a full-depth training step: doubling from ``--batch`` until
   ``torch.cuda.OutOfMemoryError``, then a binary search, capped at ``--max-batch``.
4. FLOPs per image of a full-depth step (forward + backward, FlopCounterMode) and the parameter
   count: the inputs of the scaling estimate in docs/operations.md.

Images: ``--shards DIR`` reads the pipeline's shards (train split) with the standard library
(benchmarks/gpu_inputs.py: tarfile and a pure-Python PNG decoder), decodes a pool once and feeds every
timed step from it by pinned-memory, non-blocking host-to-device copies, as the trainer's loader does;
the decoder's images/s per process is reported. Without shards (webdataset and PIL are not needed and
usually not installed on a bare GPU node): smooth synthetic photograph-like uint8 images, noted in the
output. Needs only torch and flows/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.gpu_inputs import (
    DENSEFLOW_LAYERS,
    DENSEFLOW_REDUCED_LAYERS,
    RECIPE_STEPS_PER_LEVEL,
    SIGMA,
    Feed,
    count_flops,
    imagenet64_denseflow_model,
    imagenet64_model,
    shard_images,
    synthetic_images,
)
from benchmarks.gpu_report import Row, markdown
from flows import FlowConfig, FlowModel, build_flow, initialize_actnorm, training_loss

PRECISIONS = ("fp32", "tf32", "bf16")
MODELS = ("glow", "denseflow")
GRAD_CLIP_NORM = 50.0  # configs/imagenet64.yaml optim.grad_clip_norm
LR = 1e-3  # configs/imagenet64.yaml optim.lr (Adamax)
__all__ = ["RECIPE_STEPS_PER_LEVEL", "imagenet64_model"]


# ------------------------------------------------------------------------------ precision
def _set_tf32(enabled: bool | None) -> None:
    """TF32 for cuDNN convolutions and CUDA matmuls: on, off (IEEE), or None = torch's defaults."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # torch >= 2.9 API; do not mix with the legacy allow_tf32 flags.
        conv, matmul = ("tf32", "tf32") if enabled else ("ieee", "ieee")
        if enabled is None:
            conv, matmul = _DEFAULTS
        cudnn_conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul
    else:
        conv, matmul = (True, False) if enabled is None else (enabled, enabled)
        torch.backends.cudnn.allow_tf32 = conv
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _defaults() -> tuple[str, str] | None:
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is None or not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return None
    return cudnn_conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


_DEFAULTS = _defaults()  # read before anything is changed


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Run the body in ``name``'s precision (fp32, tf32 or bf16; see the module doc)."""
    _set_tf32({"fp32": False, "tf32": True, "bf16": None}[name])
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        _set_tf32(None)


# ------------------------------------------------------------------------------ data and steps
@dataclass
class Trainer:
    """A model, its Adamax optimizer, its (possibly compiled) objective and a step counter; ``step``
    is pipeline/step.py's train step."""

    model: FlowModel
    optimizer: torch.optim.Optimizer
    objective: Callable[[torch.Tensor], torch.Tensor]
    steps: int = 0
    nonfinite: int = 0

    @classmethod
    def fresh(
        cls, cfg: FlowConfig, device: torch.device, init_batch: torch.Tensor, *,
        compile_backend: str | None = None,
    ) -> Trainer:
        torch.manual_seed(0)
        model = build_flow(cfg).to(device)
        initialize_actnorm(model, init_batch.to(device))

        def objective(batch: torch.Tensor) -> torch.Tensor:
            return training_loss(model.bits_per_dim(batch), model.regularization(), SIGMA)

        if compile_backend:
            objective = torch.compile(objective, backend=compile_backend)
        return cls(model, torch.optim.Adamax(model.parameters(), lr=LR), objective)

    def step(self, batch: torch.Tensor, mode: str, warmup: int = 0) -> float:
        for group in self.optimizer.param_groups:  # linear warm-up, as the recipe (5,000 steps there)
            group["lr"] = LR * min(1.0, (self.steps + 1) / warmup) if warmup else LR
        self.model.advance(self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        with precision(mode, batch.device):
            loss = self.objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        value = loss.item()  # synchronises the device
        if math.isfinite(value):
            self.optimizer.step()
        else:
            self.nonfinite += 1
        self.steps += 1
        return value


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ measurements
def time_training(
    cfg: FlowConfig, row: Row, pool: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> None:
    """Fills ``row``'s speed columns over ``args.timed_steps`` steps after ``args.warmup`` (and, if
    compiled, the first step's extra time as the compile time)."""
    feed = Feed(pool, args.batch, device)
    backend = args.compile_backend if row.compiled else None
    trainer = Trainer.fresh(cfg, device, feed.next(), compile_backend=backend)
    start = time.perf_counter()
    trainer.step(feed.next(), row.mode)  # compiles here when compiled
    first = time.perf_counter() - start
    for _ in range(max(0, args.warmup - 1)):
        trainer.step(feed.next(), row.mode)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.timed_steps):
        trainer.step(feed.next(), row.mode)
    sync(device)
    seconds = time.perf_counter() - start
    row.images_per_s = args.batch * args.timed_steps / seconds
    row.step_ms = seconds / args.timed_steps * 1e3
    row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    row.nonfinite = trainer.nonfinite
    if row.compiled:
        row.compile_s = first - row.step_ms / 1e3
    del trainer, feed
    free(device)


@torch.no_grad()
def fixed_batch_bpd(model: FlowModel, images: torch.Tensor, mode: str) -> torch.Tensor:
    """(B,) float64 bits/dim of ``images`` in ``mode``; the same noise every call (eval mode)."""
    model.eval()
    try:
        with precision(mode, images.device):
            torch.manual_seed(0)  # variational dequantization and DenseFlow's cross-unit noise
            bpd = model.bits_per_dim(images, generator=torch.Generator().manual_seed(0))
        return bpd.double().cpu()
    finally:
        model.train()


def largest_batch(
    cfg: FlowConfig, mode: str, device: torch.device, *, start: int, cap: int, seed: int
) -> str:
    """The largest batch (<= cap) for which one training step runs without running out of memory."""
    pool = synthetic_images(min(cap, 256), cfg.image_shape[-1], seed).to(device)
    trainer = Trainer.fresh(cfg, device, pool[: min(len(pool), 16)])

    def fits(size: int) -> bool:
        reps = -(-size // len(pool))
        batch = pool.repeat(reps, 1, 1, 1)[:size]
        ok = True
        try:
            trainer.step(batch, mode)
        except torch.cuda.OutOfMemoryError:
            ok = False  # the failed step's tensors go with the traceback when this block ends
        del batch
        trainer.optimizer.zero_grad(set_to_none=True)
        free(device)
        return ok

    if not fits(1):  # this first step also allocates the optimizer state, as in training
        return "none (1 does not fit)"
    good, bad = 1, None  # the largest size known to fit, the smallest known not to
    size = max(1, min(start, cap))
    while True:  # doubling until the first failure or the cap
        if not fits(size):
            bad = size
            break
        good = size
        if size == cap:
            break
        size = min(2 * size, cap)
    while bad is not None and bad - good > 1:  # binary search between the last fit and the first failure
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return f">= {good} (the cap)" if bad is None else str(good)


# ------------------------------------------------------------------------------ main
QUICK = {
    "image_size": 16,
    "levels": 2,
    "hidden": 16,
    "steps_per_level": 1,
    "fit_steps_per_level": 1,
    "batch": 2,
    "warmup": 1,
    "timed_steps": 2,
    "train_steps": 2,
    "eval_batch": 2,
    "max_batch": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a smoke run, no GPU numbers)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes to check the code paths: " + str(QUICK)
    )
    parser.add_argument("--models", default=",".join(MODELS), help="subset of glow,denseflow")
    parser.add_argument("--modes", default=",".join(PRECISIONS), help="subset of fp32,tf32,bf16")
    parser.add_argument("--compile-modes", default="bf16", help="precisions also timed compiled ('' = none)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--levels", type=int, default=4, help="Glow levels (the recipe's: 4)")
    parser.add_argument("--hidden", type=int, default=512, help="Glow coupling width (the recipe's: 512)")
    parser.add_argument("--steps-per-level", type=int, default=8, help="reduced Glow depth")
    parser.add_argument("--batch", type=int, default=32, help="images per step and GPU")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--timed-steps", type=int, default=15)
    parser.add_argument("--train-steps", type=int, default=100, help="fp32 steps before the bits/dim check")
    parser.add_argument("--eval-batch", type=int, default=32, help="images in the fixed bits/dim batch")
    parser.add_argument("--shards", help="the pipeline's data.root (tar shards of PNGs); default synthetic")
    parser.add_argument(
        "--fit-steps-per-level", type=int, default=RECIPE_STEPS_PER_LEVEL,
        help="full Glow depth for speed, largest batch and FLOPs (0 skips the full-depth rows)",
    )
    parser.add_argument("--fit-modes", default="bf16", help="precisions of the full-depth rows")
    parser.add_argument("--max-batch", type=int, default=1024, help="cap of the largest-batch search")
    parser.add_argument("--out", default="gpu_benchmark", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.fit_modes = [m for m in args.fit_modes.split(",") if m]
    args.compile_modes = [m for m in args.compile_modes.split(",") if m]
    for mode in args.modes + args.fit_modes + args.compile_modes:
        if mode not in PRECISIONS:
            parser.error(f"unknown precision {mode!r}; choose from {PRECISIONS}")
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {MODELS}")
    if "fp32" not in args.modes:
        args.modes.insert(0, "fp32")  # the bits/dim reference
    return args


def model_configs(name: str, args: argparse.Namespace) -> tuple[FlowConfig, FlowConfig]:
    """(reduced-depth, full-depth) config of recipe model ``name``."""
    size = args.image_size
    if name == "glow":
        shape = {"image_size": size, "hidden": args.hidden, "levels": args.levels}
        full_steps = args.fit_steps_per_level or 1
        return imagenet64_model(args.steps_per_level, **shape), imagenet64_model(full_steps, **shape)
    tiny = args.quick
    reduced = (1, 1) if tiny else DENSEFLOW_REDUCED_LAYERS
    full = (1, 1) if tiny else DENSEFLOW_LAYERS
    return (
        imagenet64_denseflow_model(reduced, image_size=size, tiny=tiny),
        imagenet64_denseflow_model(full, image_size=size, tiny=tiny),
    )


def benchmark_model(
    name: str, args: argparse.Namespace, device: torch.device, pool: torch.Tensor, eval_images: torch.Tensor
) -> tuple[list[Row], dict]:
    reduced, full = model_configs(name, args)
    flops_reduced, _ = count_flops(reduced, device)
    rows = [Row(name, "reduced", mode) for mode in args.modes]
    rows += [Row(name, "reduced", mode, compiled=True) for mode in args.compile_modes]
    for row in rows:
        time_training(reduced, row, pool, device, args)
        row.tflops = flops_reduced * row.images_per_s / 1e12
        print(f"  {name} reduced {row.mode}{' compiled' if row.compiled else ''}: "
              f"{row.images_per_s:.1f} images/s", flush=True)

    trainer = Trainer.fresh(reduced, device, pool[: args.batch].to(device))
    feed = Feed(pool, args.batch, device)
    for _ in range(args.train_steps):
        trainer.step(feed.next(), "fp32", warmup=max(1, args.train_steps // 2))
    eval_batch = eval_images.to(device)
    reference = fixed_batch_bpd(trainer.model, eval_batch, "fp32")
    for row in rows:
        if row.compiled:
            continue
        bpd = reference if row.mode == "fp32" else fixed_batch_bpd(trainer.model, eval_batch, row.mode)
        row.bpd = bpd.mean().item()
        row.bpd_delta = (bpd - reference).mean().item()
        row.bpd_max_abs = (bpd - reference).abs().max().item()
    del trainer, eval_batch, feed
    free(device)

    info = {"model": name, "reduced_flops_per_image": flops_reduced}
    if args.fit_steps_per_level > 0:
        flops, params = count_flops(full, device)
        info.update(full_flops_per_image=flops, parameters=params, gradient_bytes=4 * params)
        print(f"  {name} full: {flops / 1e9:.1f} GFLOP/image per step, {params / 1e6:.1f}M parameters")
        for mode in args.fit_modes:
            row = Row(name, "full", mode)
            time_training(full, row, pool, device, args)
            row.tflops = flops * row.images_per_s / 1e12
            row.largest_batch = largest_batch(
                full, mode, device, start=args.batch, cap=args.max_batch, seed=3
            )
            free(device)
            rows.append(row)
            print(f"  {name} full {mode}: {row.images_per_s:.1f} images/s, largest batch {row.largest_batch}",
                  flush=True)
    return rows, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # torch 2.11's set_device refuses a bare "cuda" (seen on an H200)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: no CUDA device: run with --device cpu --quick for a smoke run", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
        what = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        what = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads: a smoke run, not GPU numbers"
    size = args.image_size
    pool_size = max(args.batch * 4, args.eval_batch)
    if args.shards:
        try:
            pool, decode_rate = shard_images(args.shards, pool_size, size)
        except (OSError, ValueError) as exc:
            print(f"error: --shards {args.shards}: {exc}", file=sys.stderr)
            return 2
        source = (f"{len(pool)} images from the shards in {args.shards} (stdlib PNG decoder: "
                  f"{decode_rate:.0f} images/s per process)")
        eval_images = pool[-args.eval_batch :]
    else:
        pool = synthetic_images(pool_size, size, seed=1)
        eval_images = synthetic_images(args.eval_batch, size, seed=2)
        source = "synthetic uint8 images (no --shards given: the step is fed from host memory)"
    print(f"device: {what}; torch {torch.__version__}")
    print(f"images: {source}; batch {args.batch}, {args.timed_steps} timed steps after {args.warmup}")
    start = time.perf_counter()
    rows: list[Row] = []
    infos = []
    for name in args.models:
        model_rows, info = benchmark_model(name, args, device, pool, eval_images)
        rows += model_rows
        infos.append(info)
    table = markdown(rows)
    print("\n" + table)
    out = Path(args.out)
    header = f"device: {what}; torch {torch.__version__}\n\nimages: {source}\n\n"
    out.with_suffix(".md").write_text(header + table + "\n")
    report = {
        "device": what, "torch": torch.__version__, "images": source, "seconds": time.perf_counter() - start,
        "args": {k: v for k, v in vars(args).items()}, "models": infos, "rows": [asdict(r) for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
