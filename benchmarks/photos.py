"""Test images with natural-image statistics: random crops of scikit-image's bundled photographs
(uint8 (n, 3, size, size)), or uniform noise where scikit-image is not installed."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _pictures() -> list[torch.Tensor]:
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    return [
        torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).contiguous()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    ]


def photos(n: int, size: int, seed: int) -> torch.Tensor:
    """n random size x size crops of scikit-image's bundled photographs (uint8), noise without it."""
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
