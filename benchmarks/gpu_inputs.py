"""What benchmarks/gpu.py feeds its measurements, with torch and the standard library alone: the
recipe models (Glow and DenseFlow, reduced and full depth), their FLOPs per image, and images read
from the data pipeline's shards when they are present.

Shards (data_prep/writer.py) are USTAR tars with one ``{key}.png`` member per image (plus optional
``{key}.cls``); webdataset and PIL are not needed to read them: ``tarfile`` lists the members and
``decode_png`` decodes the 8-bit, non-interlaced PNGs data_prep writes (zlib + the five PNG row
filters) in pure Python. That decoder is slow (milliseconds per 64x64 image), so the benchmark
decodes a pool of images once, untimed, and feeds the timed steps from it with pinned-memory,
non-blocking copies; ``decode_rate`` measures the decoder separately.
"""

from __future__ import annotations

import math
import struct
import tarfile
import time
import zlib
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from flows import (
    DenseFlowConfig,
    DequantizerConfig,
    FlowConfig,
    SplitConfig,
    build_flow,
    initialize_actnorm,
    training_loss,
)

SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig; the recipes')

RECIPE_STEPS_PER_LEVEL = 48  # configs/imagenet64.yaml model.num_steps
DENSEFLOW_LAYERS = (5, 6, 20)  # configs/imagenet64_denseflow.yaml model.denseflow.layers (--layers_conf)
DENSEFLOW_REDUCED_LAYERS = (1, 1, 4)


def imagenet64_model(
    steps_per_level: int, *, image_size: int = 64, hidden: int = 512, levels: int = 4
) -> FlowConfig:
    """configs/imagenet64.yaml's model section (Glow base) with ``num_steps`` = ``steps_per_level``."""
    return FlowConfig(
        image_shape=(3, image_size, image_size),
        num_levels=levels,
        num_steps=steps_per_level,
        hidden_channels=hidden,
        coupling="affine",
        learn_top_prior=True,
        split=SplitConfig(strategy="eiw"),
    )


def imagenet64_denseflow_model(
    layers: tuple[int, ...] = DENSEFLOW_LAYERS, *, image_size: int = 64, tiny: bool = False
) -> FlowConfig:
    """configs/imagenet64_denseflow.yaml's model section with ``denseflow.layers`` = ``layers``;
    ``tiny``: 2 levels of narrow nets, for ``--quick`` CPU smoke runs."""
    if not tiny:
        dense, dequantizer, levels = DenseFlowConfig(layers=tuple(layers)), DequantizerConfig(), 3
    else:
        levels = 2
        dense = DenseFlowConfig(
            units=(2, 1), layers=tuple(layers[:2]), mid_channels=(8, 8), growth_rate=2, net_depth=1,
            net_growth=8,
        )
        dequantizer = DequantizerConfig(
            num_steps=1, context_channels=4, mid_channels=8, depth=1, growth=4, context_depth=1,
            context_growth=4,
        )
    return FlowConfig(
        base="denseflow",
        image_shape=(3, image_size, image_size),
        num_levels=levels,
        split_prior="standard",
        learn_top_prior=True,
        dequantization="variational",
        denseflow=dense,
        dequantizer=dequantizer,
        split=SplitConfig(strategy="eiw"),
        memory="standard",
    )


def count_flops(cfg: FlowConfig, device: torch.device, batch: int = 1) -> tuple[float, int]:
    """(FLOPs per image of one training step, forward + backward, parameter count): counted with
    FlopCounterMode (convolutions and matmuls, 2 FLOPs per multiply-add) on a batch of ``batch``."""
    torch.manual_seed(0)
    model = build_flow(cfg).to(device)
    images = torch.randint(0, 256, (max(batch, 2), *cfg.image_shape), dtype=torch.uint8).to(device)
    initialize_actnorm(model, images)
    images = images[:batch]
    model.advance(0)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = training_loss(model.bits_per_dim(images), model.regularization(), SIGMA)
        loss.backward()
    params = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops() / batch, params


# ------------------------------------------------------------------------------ images
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


class Feed:
    """Host batches (pinned on CUDA) cycled to the device with non-blocking copies, as the loader."""

    def __init__(self, pool: torch.Tensor, batch: int, device: torch.device) -> None:
        reps = -(-batch // len(pool))
        pool = pool.repeat(reps, 1, 1, 1)
        self.batches = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)] or [pool[:batch]]
        if device.type == "cuda":
            self.batches = [b.pin_memory() for b in self.batches]
        self.device, self.i = device, 0

    def next(self) -> torch.Tensor:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch.to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------ shards
def decode_png(data: bytes) -> torch.Tensor:
    """An 8-bit grayscale/RGB/RGBA non-interlaced PNG -> uint8 (C, H, W) (RGB; gray is repeated)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up = prev[i]
            if kind == 1:
                row[i] = (row[i] + left) & 255
            elif kind == 2:
                row[i] = (row[i] + up) & 255
            elif kind == 3:
                row[i] = (row[i] + ((left + up) >> 1)) & 255
            elif kind == 4:
                corner = prev[i - channels] if i >= channels else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        out[y * stride : (y + 1) * stride] = row
        prev = row
    image = torch.frombuffer(out, dtype=torch.uint8).view(height, width, channels).permute(2, 0, 1)
    image = image[:3] if channels >= 3 else image.expand(3, height, width)
    return image.contiguous()


def shard_files(root: str | Path) -> list[Path]:
    """The ``*.tar`` shards under ``root`` (the pipeline's ``data.root``; train split first)."""
    root = Path(root)
    train = sorted((root / "train").glob("*.tar")) if (root / "train").is_dir() else []
    return train or sorted(root.rglob("*.tar"))


def shard_images(root: str | Path, num: int, size: int) -> tuple[torch.Tensor, float]:
    """(uint8 (num', 3, size, size) decoded from the shards under ``root``, decode images/s of one
    process); num' <= num (what the shards hold). Raises ValueError if no shard or image fits."""
    images: list[torch.Tensor] = []
    seconds = 0.0
    for path in shard_files(root):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(".png"):
                    continue
                data = tar.extractfile(member).read()
                start = time.perf_counter()
                image = decode_png(data)
                seconds += time.perf_counter() - start
                if tuple(image.shape) == (3, size, size):
                    images.append(image)
                if len(images) == num:
                    return torch.stack(images), len(images) / seconds
    if not images:
        raise ValueError(f"{root}: no {size}x{size} PNG images in *.tar shards")
    return torch.stack(images), len(images) / seconds
