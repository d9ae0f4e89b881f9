"""Converters from official dataset layouts to WebDataset shards + manifest.json, a verifier, and loaders.

Public entry points (imported lazily so `import data_prep` stays cheap):
- `ensure_sample_shards(out_dir, resolution=32, ...) -> Path` (data_prep.sources.sample)
- `read_manifest(split_dir) -> dict` (data_prep.manifest)
- `train_loader`, `eval_loader`, `shard_urls` (data_prep.loading; needs torch)
CLI: `python -m data_prep --help`; formats and policies: docs/data.md.
"""

from __future__ import annotations

_LAZY = {
    "ensure_sample_shards": "data_prep.sources.sample",
    "read_manifest": "data_prep.manifest",
    "train_loader": "data_prep.loading",
    "eval_loader": "data_prep.loading",
    "shard_urls": "data_prep.loading",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
