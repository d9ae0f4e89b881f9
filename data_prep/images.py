"""Pixel helpers shared by every converter: lossless PNG encoding, mode policy, resize protocols.

All geometry is done with PIL so a test can recompute the exact same pixels with a few PIL calls.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# zlib level for the PNGs. Default 0 (stored deflate blocks, still lossless PNG): 64x64 photos take
# ~13 KB instead of ~7 KB at level 1, but decode ~1.7x faster, and decoding is what training pays
# for on every epoch (docs/benchmarks.md). Any fixed level is deterministic for a given zlib.
# The converter sets it per run (`--png-level`) through set_png_level in each worker.
DEFAULT_PNG_LEVEL = 0
PNG_COMPRESS_LEVEL = DEFAULT_PNG_LEVEL
# BICUBIC in PIL is area-aware when downscaling (its support grows with the scale factor), so it
# does not alias the way a plain bicubic sampler would.
RESAMPLE = Image.Resampling.BICUBIC
ACCEPTED_MODES = ("RGB", "L")


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can decode (corrupt or truncated)."""


def set_png_level(level: int) -> None:
    global PNG_COMPRESS_LEVEL
    if not 0 <= level <= 9:
        raise ValueError(f"--png-level must be 0..9, got {level}")
    PNG_COMPRESS_LEVEL = level


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, C) uint8 array as PNG, deterministically (no metadata chunks)."""
    assert pixels.dtype == np.uint8 and pixels.ndim in (2, 3), (pixels.dtype, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def decode_bytes(data: bytes, *, name: str) -> Image.Image:
    """Decode encoded image bytes (any format PIL reads: webp, jpeg, png, ...); fully loads pixels."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise UndecodableImage(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return img


def open_file(path, *, name: str | None = None) -> Image.Image:
    """Open and fully load an image file; a decode failure names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            # Image.open holds the file handle; the copy owns its pixels so the file can close.
            return img.copy()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise UndecodableImage(f"{name or path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image, *, name: str) -> Image.Image:
    """Apply the mode policy: RGB passes, L (grayscale) is replicated to RGB, anything else is an error.

    Silently converting RGBA/P/CMYK would invent or drop information (alpha, palette transparency,
    ink model), so those stop the conversion with the offending file or key named.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "L":
        return img.convert("RGB")
    raise ValueError(f"{name}: unexpected image mode {img.mode!r} (expected one of {ACCEPTED_MODES})")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`; the longer side is rounded to the nearest pixel."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return img.resize(new, RESAMPLE)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central size x size crop; odd margins put the extra pixel on the right/bottom."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def shorter_side_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The 'center' protocol: shorter side to `size`, then a central square."""
    return center_crop(resize_shorter_side(img, size), size)


def to_array(img: Image.Image) -> np.ndarray:
    """(H, W, C) uint8 for RGB, (H, W) for L."""
    return np.asarray(img, dtype=np.uint8)
