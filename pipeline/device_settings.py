"""The GPU settings torch leaves to the user, and ``run.compile``: chosen once per run, logged once.

``choose_settings(device_type, cfg)`` is a pure function of the device type and the config (a unit
test checks a "cuda" decision on a machine without a GPU); ``apply_settings`` sets torch's global
flags; ``compile_objective`` wraps the (DDP-wrapped) training objective. On CPU every GPU setting is
off (they are no-ops or slower there) and ``run.compile: auto`` stays eager. docs/operations.md,
"GPU throughput", gives each setting's default and why.

- ``cudnn_benchmark``: cuDNN times its convolution algorithms on the first call of each shape and
  keeps the fastest; the step's shapes never change (fixed batch, ``partial=False`` batching).
- ``tf32``: float32 matmuls and convolutions on TensorFloat-32 tensor cores (10-bit mantissa inputs,
  float32 accumulation). Under bf16 autocast only the float32 islands (log-determinants, the
  Nystrom pseudo-inverse) are affected; ``gpu.tf32: false`` for float32 reproductions of a paper.
- ``channels_last``: NHWC memory format for the model and the batch. Unmeasured (no GPU has run
  this code yet): off until ``benchmarks/gpu.py`` shows it helps.
- ``pin_memory``: the loader's batches in page-locked memory, so ``.to(device, non_blocking=True)``
  is an asynchronous copy.
- ``fused_optimizer``: Adam's fused CUDA kernel, Adamax's foreach kernels; both ``capturable`` (the
  step counter on the device), which the device-side skip of a non-finite step needs
  (pipeline/step.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.config_loading import ConfigModel

log = logging.getLogger(__name__)


class GpuConfig(ConfigModel):
    """Settings used on CUDA devices only (ignored on CPU); see the module doc of
    pipeline/device_settings.py for each one's reason."""

    cudnn_benchmark: bool = True
    tf32: bool = True
    channels_last: bool = False
    pin_memory: bool = True
    fused_optimizer: bool = True


# Why a memory mode cannot be compiled (run.compile: true refuses it; auto leaves it eager).
COMPILE_REFUSED_MEMORY = {
    "invertible": (
        "model.memory=invertible rebuilds activations in a custom autograd.Function whose backward "
        "hands tensors between steps through a Python tape (flows/invertible.py); dynamo cannot trace "
        "it. Use model.memory=checkpoint or standard with run.compile"
    ),
}


def compile_refusal(cfg) -> str | None:
    """Why ``cfg`` cannot be compiled, or None."""
    return COMPILE_REFUSED_MEMORY.get(cfg.model.memory)


@dataclass(frozen=True)
class DeviceSettings:
    device_type: str
    compile: bool
    compile_note: str
    cudnn_benchmark: bool
    tf32: bool
    channels_last: bool
    pin_memory: bool
    fused_optimizer: bool

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k not in ("compile_note", "device_type")]
        note = f" ({self.compile_note})" if self.compile_note else ""
        return f"{self.device_type}: " + ", ".join(parts) + note


def choose_settings(device_type: str, cfg) -> DeviceSettings:
    """(device type, TrainConfig) -> the settings this run uses. ValueError for ``run.compile: true``
    with a memory mode that cannot be compiled (the reason named)."""
    cuda = device_type == "cuda"
    gpu = cfg.gpu
    refused = compile_refusal(cfg)
    wanted = cfg.run.compile
    if wanted is True and refused:
        raise ValueError(f"run.compile: true cannot be used: {refused}")
    if wanted == "auto":
        compile_ = cuda and refused is None
        note = "auto: on for CUDA" if compile_ else ("auto: " + (refused or "eager on CPU"))
    else:
        compile_, note = bool(wanted), ""
    return DeviceSettings(
        device_type=device_type,
        compile=compile_,
        compile_note=note,
        cudnn_benchmark=cuda and gpu.cudnn_benchmark,
        tf32=cuda and gpu.tf32,
        channels_last=cuda and gpu.channels_last,
        pin_memory=cuda and gpu.pin_memory,
        fused_optimizer=cuda and gpu.fused_optimizer,
    )


def apply_settings(settings: DeviceSettings) -> None:
    """Set torch's process-global flags (CUDA only; on CPU nothing changes)."""
    if settings.device_type != "cuda":
        return
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    precision = "tf32" if settings.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def optimizer_options(settings: DeviceSettings, name: str) -> dict:
    """Extra keyword arguments for ``torch.optim.Adam``/``Adamax``."""
    if not settings.fused_optimizer:
        return {}
    if name == "adam":
        return {"fused": True}
    return {"foreach": True, "capturable": True}


def compile_objective(objective: nn.Module, settings: DeviceSettings) -> nn.Module:
    """``torch.compile`` of the (DDP-wrapped) objective's forward when ``settings.compile``.

    Compiling the DDP module lets dynamo's DDPOptimizer split the graph at gradient-bucket
    boundaries, so the all-reduce still overlaps backward. Compilation happens lazily, on the first
    step; ``FirstStepClock`` logs how long that took. Inductor's cache: $TORCHINDUCTOR_CACHE_DIR
    (default /tmp/torchinductor_$USER), reused by later runs with the same graphs.

    Random draws (dequantization and DenseFlow's cross-unit noise) are inductor's own, fused into
    its kernels: same distribution as eager's, different numbers for the same seed. Tests comparing
    compiled with eager set ``torch._inductor.config.fallback_random = True`` (eager's draws), which
    made the Glow step about 1.25x slower on an H200 (docs/operations.md, GPU throughput).
    """
    if not settings.compile:
        return objective
    return torch.compile(objective)


class FirstStepClock:
    """Times the first step of a run (with compilation, its compile time) and logs it once."""

    def __init__(self, compiled: bool) -> None:
        self.compiled, self.pending, self._start = compiled, True, 0.0

    def start(self) -> None:
        if self.pending:
            self._start = time.perf_counter()

    def stop(self, say) -> float | None:
        if not self.pending:
            return None
        self.pending = False
        seconds = time.perf_counter() - self._start
        what = "compilation included (run.compile)" if self.compiled else "eager"
        say(f"first step took {seconds:.1f} s ({what})")
        return seconds
