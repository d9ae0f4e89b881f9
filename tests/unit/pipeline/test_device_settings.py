"""The GPU settings are a pure function of (device type, config): a "cuda" decision checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.device_settings import apply_settings, choose_settings, optimizer_options
from pipeline.step import make_optimizer

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_cuda_gets_the_throughput_settings_and_cpu_none():
    cfg = load_config(CONFIGS / "tiny.yaml")
    cuda = choose_settings("cuda", cfg)
    assert cuda.cudnn_benchmark and cuda.tf32 and cuda.pin_memory and cuda.fused_optimizer
    assert not cuda.channels_last  # unmeasured: off until benchmarks/gpu.py shows it helps
    assert cuda.compile  # run.compile: auto
    cpu = choose_settings("cpu", cfg)
    assert not any([cpu.cudnn_benchmark, cpu.tf32, cpu.pin_memory, cpu.fused_optimizer, cpu.compile])
    assert "cuda: compile=True" in cuda.describe()


def test_each_gpu_key_switches_its_setting():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["gpu.tf32=false", "gpu.cudnn_benchmark=false", "gpu.channels_last=true", "run.compile=false"],
    )
    cuda = choose_settings("cuda", cfg)
    assert not cuda.tf32 and not cuda.cudnn_benchmark and cuda.channels_last and not cuda.compile


def test_fused_optimizer_options_per_optimizer():
    cuda = choose_settings("cuda", load_config(CONFIGS / "tiny.yaml"))
    assert optimizer_options(cuda, "adam") == {"fused": True}
    assert optimizer_options(cuda, "adamax") == {"foreach": True, "capturable": True}
    cpu = choose_settings("cpu", load_config(CONFIGS / "tiny.yaml"))
    assert optimizer_options(cpu, "adam") == {}
    # The options are ones torch's optimizers accept (constructed on CPU; fused Adam runs on CPU too).
    cfg = load_config(CONFIGS / "tiny.yaml")
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, **optimizer_options(cuda, "adam"))
    assert optimizer.defaults["fused"]


def test_apply_settings_leaves_cpu_flags_alone():
    before = torch.backends.cudnn.benchmark
    apply_settings(choose_settings("cpu", load_config(CONFIGS / "tiny.yaml", ["gpu.cudnn_benchmark=true"])))
    assert torch.backends.cudnn.benchmark == before
