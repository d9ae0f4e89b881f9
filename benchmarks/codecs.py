"""Bits/dim that plain lossless codecs reach on a test split: where a flow stands against PNG and WebP.

    python -m benchmarks.codecs [--data data/sample-32/test]

Each test image is compressed on its own (a density model also scores each image on its own), with
the codecs' strongest lossless settings: PNG through zlib level 9 with Pillow's ``optimize`` (it
tries the filter strategies), WebP lossless with ``quality=100, method=6`` (slowest, smallest).
bits/dim = 8 * file bytes / (C * H * W), headers included: that is what a user storing the file pays.
For 32x32 crops the headers are a visible share (a PNG's fixed chunks are 57 bytes, 0.15 bits/dim),
so the table also gives the size without them where the format allows (PNG's IDAT payload alone).
Prints one markdown table; docs/results.md quotes it beside the ablation.
"""

from __future__ import annotations

import argparse
import io
import struct

import numpy as np
from PIL import Image

from data_prep.loading import eval_loader


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True, compress_level=9)
    return buffer.getvalue()


def webp_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    return buffer.getvalue()


def png_idat_bytes(png: bytes) -> int:
    """Bytes of the compressed pixel stream (IDAT chunk payloads) of a PNG file."""
    total, offset = 0, 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        if png[offset + 4 : offset + 8] == b"IDAT":
            total += length
        offset += 12 + length
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/sample-32/test", help="a split folder with manifest.json")
    args = parser.parse_args(argv)
    sizes: dict[str, list[float]] = {"PNG (level 9, optimize)": [], "PNG pixel stream only (IDAT)": [],
                                     "WebP lossless (method 6)": []}  # fmt: skip
    num_images = 0
    for batch in eval_loader(args.data, batch_size=256, rank=0, world_size=1):
        for pixels in batch.numpy():
            dims = pixels.size
            image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
            png = png_bytes(image)
            webp = webp_bytes(image)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(webp))), np.asarray(image)), "not lossless"
            sizes["PNG (level 9, optimize)"].append(8 * len(png) / dims)
            sizes["PNG pixel stream only (IDAT)"].append(8 * png_idat_bytes(png) / dims)
            sizes["WebP lossless (method 6)"].append(8 * len(webp) / dims)
            num_images += 1
    print(f"{num_images} images from {args.data}\n")
    print("| codec | bits/dim (mean over images) | std |")
    print("|---|---|---|")
    for name, values in sizes.items():
        print(f"| {name} | {np.mean(values):.3f} | {np.std(values):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
