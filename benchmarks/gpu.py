"""One GPU, torch alone: speed, memory and bits/dim of the ImageNet-64 flow in fp32, tf32 and bf16.

    python benchmarks/gpu.py                          # CUDA device 0, the defaults below
    python benchmarks/gpu.py --device cpu --quick     # smoke run of every code path, tiny sizes

The model is configs/imagenet64.yaml's (4 levels, 512 hidden channels, affine coupling, learned top
prior, EIW split with sigma 1e-3) at reduced depth (``--steps-per-level``, default 8 of the recipe's
48). One training step is what pipeline/step.py does: ``model.advance(step)``, bits/dim under the
precision's autocast, loss = ``flows.training_loss`` (mean bits/dim + sigma *
``model.regularization()``, in float32), backward, gradient clipping at 50, an Adamax step. Three precisions:

- ``fp32``: float32 with TF32 off for convolutions and matmuls (IEEE float32, the reference).
- ``tf32``: float32 with TF32 on for both.
- ``bf16``: bf16 autocast with torch's default float32 settings: what ``run.precision: auto`` trains
  with on a GPU (the pipeline sets no TF32 flag; torch's default runs cuDNN convolutions in TF32).

Three measurements, printed as one markdown table:

1. images/s and peak memory (``torch.cuda.max_memory_allocated`` over the timed steps: weights,
   optimizer state and activations) of ``--batch`` images per step, each precision on a fresh model.
2. bits/dim of one fixed batch (``--eval-batch`` images, dequantization noise from
   ``torch.Generator().manual_seed(0)``) from one model, first trained ``--train-steps`` steps in
   fp32 so the zero-initialised couplings are no longer the identity; the difference to fp32 is the
   error a precision adds to the likelihood (goal for bf16: within 1e-3 bits/dim).
3. the largest batch one training step fits (``--fit-steps-per-level``, default the recipe's full
   depth 48): doubling from ``--batch`` until ``torch.cuda.OutOfMemoryError``, then a binary search,
   with memory freed between tries; capped at ``--max-batch``.

Images: smooth synthetic photographs-like images (low-frequency patterns plus pixel noise, fixed
seed), or ``--images FILE``: a uint8 tensor (N, 3, 64, 64) saved with ``torch.save`` (loaded with
``weights_only=True``), e.g. ImageNet-64 validation images. Needs only torch and flows/ (pure torch):
no Ray, MLflow or webdataset.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import FlowConfig, FlowModel, SplitConfig, build_flow, initialize_actnorm, training_loss  # noqa: E402

SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig)

PRECISIONS = ("fp32", "tf32", "bf16")
RECIPE_STEPS_PER_LEVEL = 48
GRAD_CLIP_NORM = 50.0  # configs/imagenet64.yaml optim.grad_clip_norm
LR = 1e-3  # configs/imagenet64.yaml optim.lr (Adamax)


def imagenet64_model(
    steps_per_level: int, *, image_size: int = 64, hidden: int = 512, levels: int = 4
) -> FlowConfig:
    """configs/imagenet64.yaml's model section with ``num_steps`` = ``steps_per_level``."""
    return FlowConfig(
        image_shape=(3, image_size, image_size),
        num_levels=levels,
        num_steps=steps_per_level,
        hidden_channels=hidden,
        coupling="affine",
        learn_top_prior=True,
        split=SplitConfig(strategy="eiw"),
    )


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
def synthetic_images(num: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (num, 3, size, size): a smooth colour gradient plus a few low-frequency sinusoids per
    channel, plus pixel noise of std 3 levels; closer to photographs' bits/dim than uniform noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    base = torch.rand(num, 3, 1, 1, generator=g) * 160 + 40
    tilt = (torch.rand(num, 3, 2, 1, 1, generator=g) - 0.5) * 120
    img = base + tilt[:, :, 0] * yy + tilt[:, :, 1] * xx
    for _ in range(4):
        freq = torch.rand(num, 1, 2, 1, 1, generator=g) * 6 * math.pi
        phase = torch.rand(num, 1, 1, 1, generator=g) * 2 * math.pi
        amp = (torch.rand(num, 3, 1, 1, generator=g) - 0.5) * 60
        img = img + amp * torch.sin(freq[:, :, 0] * yy + freq[:, :, 1] * xx + phase)
    img = img + torch.randn(img.shape, generator=g) * 3
    return img.round().clamp(0, 255).to(torch.uint8)


def load_images(path: str | None, num: int, size: int, seed: int) -> torch.Tensor:
    if path is None:
        return synthetic_images(num, size, seed)
    images = torch.load(path, map_location="cpu", weights_only=True)
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.uint8
        or images.shape[1:] != (3, size, size)
    ):
        raise ValueError(f"{path}: expected a uint8 tensor (N, 3, {size}, {size})")
    if len(images) < num:
        raise ValueError(f"{path}: {len(images)} images, need at least {num}")
    return images[:num].clone()


@dataclass
class Trainer:
    """A model, its Adamax optimizer and a step counter; ``step`` is pipeline/step.py's train step."""

    model: FlowModel
    optimizer: torch.optim.Optimizer
    steps: int = 0
    nonfinite: int = 0

    @classmethod
    def fresh(cls, cfg: FlowConfig, device: torch.device, init_batch: torch.Tensor) -> Trainer:
        torch.manual_seed(0)
        model = build_flow(cfg).to(device)
        initialize_actnorm(model, init_batch.to(device))
        return cls(model, torch.optim.Adamax(model.parameters(), lr=LR))

    def step(self, batch: torch.Tensor, mode: str, warmup: int = 0) -> float:
        for group in self.optimizer.param_groups:  # linear warm-up, as the recipe (5,000 steps there)
            group["lr"] = LR * min(1.0, (self.steps + 1) / warmup) if warmup else LR
        self.model.advance(self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        with precision(mode, batch.device):
            bpd = self.model.bits_per_dim(batch)
            reg = self.model.regularization()
        loss = training_loss(bpd, reg, SIGMA)
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
@dataclass
class Row:
    mode: str
    images_per_s: float = math.nan
    step_ms: float = math.nan
    peak_gib: float = math.nan
    nonfinite: int = 0
    bpd: float = math.nan
    bpd_delta: float = math.nan
    bpd_max_abs: float = math.nan
    largest_batch: str = "-"


def time_training(
    cfg: FlowConfig, mode: str, images: torch.Tensor, device: torch.device, *, warmup: int, steps: int
) -> tuple[float, float, float, int]:
    """(images/s, ms per step, peak GiB, non-finite steps) over ``steps`` steps after ``warmup``."""
    batch = images.to(device)
    trainer = Trainer.fresh(cfg, device, batch)
    for _ in range(warmup):
        trainer.step(batch, mode)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch, mode)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    nonfinite = trainer.nonfinite
    del trainer, batch
    free(device)
    return len(images) * steps / seconds, seconds / steps * 1e3, peak, nonfinite


@torch.no_grad()
def fixed_batch_bpd(model: FlowModel, images: torch.Tensor, mode: str) -> torch.Tensor:
    """(B,) float64 bits/dim of ``images`` in ``mode``; the same dequantization noise every call."""
    model.eval()
    try:
        with precision(mode, images.device):
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
    parser.add_argument(
        "--modes", default=",".join(PRECISIONS), help="comma-separated subset of fp32,tf32,bf16"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="coupling width (the recipe's: 512)")
    parser.add_argument("--steps-per-level", type=int, default=8, help="depth for speed and bits/dim")
    parser.add_argument("--batch", type=int, default=32, help="images per step (the recipe's per GPU: 32)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=200, help="fp32 steps before the bits/dim check")
    parser.add_argument("--eval-batch", type=int, default=64, help="images in the fixed bits/dim batch")
    parser.add_argument(
        "--images", help="uint8 tensor (N, 3, H, W) saved with torch.save (default: synthetic)"
    )
    parser.add_argument(
        "--fit-steps-per-level",
        type=int,
        default=RECIPE_STEPS_PER_LEVEL,
        help="depth for the largest-batch search (0 skips it)",
    )
    parser.add_argument("--fit-modes", default="bf16", help="precisions for the largest-batch search")
    parser.add_argument("--max-batch", type=int, default=2048, help="cap of the largest-batch search")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.modes = [m for m in args.modes.split(",") if m]
    args.fit_modes = [m for m in args.fit_modes.split(",") if m]
    for mode in args.modes + args.fit_modes:
        if mode not in PRECISIONS:
            parser.error(f"unknown precision {mode!r}; choose from {PRECISIONS}")
    if "fp32" not in args.modes:
        args.modes.insert(0, "fp32")  # the bits/dim reference
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu --quick for a smoke run", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
        what = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        what = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads: a smoke run, not GPU numbers"
    cfg = imagenet64_model(
        args.steps_per_level, image_size=args.image_size, hidden=args.hidden, levels=args.levels
    )
    size = args.image_size
    train_images = load_images(None, args.batch, size, seed=1)
    eval_images = load_images(args.images, args.eval_batch, size, seed=2)
    print(f"device: {what}; torch {torch.__version__}")
    print(
        f"model: {cfg.num_levels} levels x {cfg.num_steps} steps, hidden {cfg.hidden_channels}, "
        f"{size}x{size}, eiw split; batch {args.batch}, {args.timed_steps} timed steps after {args.warmup}"
    )

    rows = {mode: Row(mode) for mode in args.modes}
    for mode in args.modes:
        row = rows[mode]
        row.images_per_s, row.step_ms, row.peak_gib, row.nonfinite = time_training(
            cfg, mode, train_images, device, warmup=args.warmup, steps=args.timed_steps
        )
        print(f"  timed {mode}: {row.images_per_s:.1f} images/s", flush=True)

    trainer = Trainer.fresh(cfg, device, train_images.to(device))
    for _ in range(args.train_steps):
        trainer.step(train_images.to(device), "fp32", warmup=max(1, args.train_steps // 2))
    eval_batch = eval_images.to(device)
    reference = fixed_batch_bpd(trainer.model, eval_batch, "fp32")
    for mode in args.modes:
        bpd = reference if mode == "fp32" else fixed_batch_bpd(trainer.model, eval_batch, mode)
        rows[mode].bpd = bpd.mean().item()
        rows[mode].bpd_delta = (bpd - reference).mean().item()
        rows[mode].bpd_max_abs = (bpd - reference).abs().max().item()
    source = f"images from {args.images}" if args.images else "synthetic images"
    print(
        f"  bits/dim: trained {args.train_steps} fp32 steps ({trainer.nonfinite} non-finite), "
        f"{len(eval_batch)} {source}",
        flush=True,
    )
    del trainer, eval_batch
    free(device)

    if args.fit_steps_per_level > 0:
        fit_cfg = imagenet64_model(
            args.fit_steps_per_level, image_size=args.image_size, hidden=args.hidden, levels=args.levels
        )
        for mode in args.fit_modes:
            rows.setdefault(mode, Row(mode)).largest_batch = largest_batch(
                fit_cfg, mode, device, start=args.batch, cap=args.max_batch, seed=3
            )
            free(device)  # the search's model and optimizer went with its frame
            print(f"  largest batch {mode}: {rows[mode].largest_batch}", flush=True)

    fit = f"largest batch, {args.fit_steps_per_level} steps/level" if args.fit_steps_per_level else "-"
    print(
        "\n| precision | images/s | step ms | peak GiB | non-finite steps | bits/dim | vs fp32 (mean) "
        f"| max abs per image | within 1e-3 | {fit} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        within = "-"
        if row.mode != "fp32" and not math.isnan(row.bpd_delta):
            within = "yes" if abs(row.bpd_delta) <= 1e-3 else "no"
        cells = [
            row.mode,
            _number(row.images_per_s, ".1f"),
            _number(row.step_ms, ".1f"),
            _number(row.peak_gib, ".2f"),
            str(row.nonfinite),
            _number(row.bpd, ".5f"),
            _number(row.bpd_delta, "+.2e"),
            _number(row.bpd_max_abs, ".2e"),
            within,
            row.largest_batch,
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
