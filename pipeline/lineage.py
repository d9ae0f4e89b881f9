"""What a run was made of: its shards (MLflow dataset inputs) and its code (git commit, image tag).

Data: each split directory's ``manifest.json`` (data_prep) lists every shard with its sha256, so the
manifest already fingerprints the data. ``ShardDataset`` turns one split into an MLflow dataset:

    shards_sha256 = sha256 over the manifest's shards, in manifest order, one line each:
                    f"{name} {sha256} {count}\\n"   (UTF-8)
    digest        = shards_sha256[:16]  (MLflow stores at most 36 characters)

Two runs share a digest exactly when they read byte-identical shards in the same grouping; no shard
is read to compute it. The dataset's profile holds the source, split, resolution, channels, n_bits,
image and shard counts and the full ``shards_sha256``; its schema is the uint8 tensor the loader yields.

Code: the git commit of the checkout this package is imported from, and whether tracked files differ
from it (``git status --porcelain --untracked-files=no``). Without a ``git`` program (the project
image has none) but with a ``.git`` directory (``ray job submit --working-dir .`` uploads it), the
commit is read from ``.git`` itself and the dirty flag is ``unknown``. Without either (the image's
``/app``), the commit comes from ``EIW_GIT_COMMIT`` (and ``EIW_GIT_DIRTY``), which the Dockerfile
bakes in from build arguments. ``EIW_IMAGE`` names the container image (e.g. ``eiw-flow:0.1.0``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.types import Schema, TensorSpec

from data_prep.manifest import read_manifest
from data_prep.storage import RemotePath, as_path

log = logging.getLogger(__name__)

DIGEST_CHARS = 16
CONTEXTS = {"train": "training", "test": "testing"}  # split directory -> MLflow input context

# MLflow's own tag for the commit (the run page shows it); the rest are ours.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "pipeline.git.dirty"
GIT_COMMITS_TAG = "pipeline.git.commits"  # every commit that trained this run, in order (resumes)
CODE_SOURCE_TAG = "pipeline.code_source"  # git, git-files, env or unknown
IMAGE_TAG = "pipeline.image"

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def shards_sha256(manifest: dict) -> str:
    """The manifest's shard list as one sha256 (see the module doc for the exact bytes)."""
    h = hashlib.sha256()
    for shard in manifest["shards"]:
        h.update(f"{shard['name']} {shard['sha256']} {int(shard['count'])}\n".encode())
    return h.hexdigest()


class ShardDataset(Dataset):
    """One split of WebDataset shards, described by its manifest (no shard is opened)."""

    def __init__(self, split_dir: str | Path) -> None:
        found = as_path(split_dir)
        self.split_dir = found if isinstance(found, RemotePath) else found.resolve()
        self.manifest = read_manifest(self.split_dir)
        self.shards_sha256 = shards_sha256(self.manifest)
        m = self.manifest
        height, width = (int(v) for v in m["resolution"])
        name = f"{m['source']}-{height}x{width}-{m['split']}"
        super().__init__(
            source=(
                resolve_dataset_source(str(self.split_dir))  # s3:// -> MLflow's S3 artifact source
                if isinstance(self.split_dir, RemotePath)
                else LocalArtifactDatasetSource(str(self.split_dir))
            ),
            name=name,
            digest=self.shards_sha256[:DIGEST_CHARS],
        )

    def _compute_digest(self) -> str:
        return self.shards_sha256[:DIGEST_CHARS]

    @property
    def profile(self) -> dict[str, Any]:
        m = self.manifest
        profile = {
            "source": m["source"],
            "split": m["split"],
            "resolution": [int(v) for v in m["resolution"]],
            "channels": int(m["channels"]),
            "n_bits": int(m["n_bits"]),
            "sample_format": m["sample_format"],
            "num_images": int(m["total"]),
            "num_shards": len(m["shards"]),
            "shards_sha256": self.shards_sha256,
        }
        if m.get("train_crop"):
            profile["train_crop"] = int(m["train_crop"])
        return profile

    @property
    def schema(self) -> Schema:
        c, (h, w) = int(self.manifest["channels"]), self.manifest["resolution"]
        return Schema([TensorSpec(np.dtype(np.uint8), (-1, c, int(h), int(w)), name="images")])

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile)
        config["schema"] = json.dumps({"mlflow_tensorspec": self.schema.to_dict()})
        return config


def shard_datasets(data_root: str | Path) -> dict[str, ShardDataset]:
    """{MLflow context: dataset} for the train and test splits under ``data_root``."""
    return {context: ShardDataset(as_path(data_root) / split) for split, context in CONTEXTS.items()}


# --------------------------------------------------------------------------------------- code
def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


_SHA1 = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _head_from_files(root: Path) -> str | None:
    """HEAD's commit read from ``root/.git`` without the git program (loose or packed refs)."""
    git_dir = root / ".git"
    try:
        if git_dir.is_file():  # a worktree or submodule: "gitdir: <path>"
            git_dir = (root / git_dir.read_text().strip().removeprefix("gitdir:").strip()).resolve()
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _SHA1.fullmatch(head) else None
        ref = head.removeprefix("ref:").strip()
        common = git_dir
        if (git_dir / "commondir").is_file():
            common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
        for base in (git_dir, common):
            if (base / ref).is_file():
                sha = (base / ref).read_text().strip()
                return sha if _SHA1.fullmatch(sha) else None
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _SHA1.fullmatch(sha):
                return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def code_version(root: str | Path = PACKAGE_ROOT) -> dict[str, str]:
    """{"commit", "dirty" ("true"/"false"/"unknown"), "source" (git/git-files/env/unknown), "image"?}.

    ``root``: the checkout to ask git about (default: the one this package is imported from).
    """
    found: dict[str, str]
    commit = _git("rev-parse", "--verify", "HEAD", cwd=Path(root))
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=Path(root))
        dirty = "unknown" if status is None else str(bool(status.strip())).lower()
        found = {"commit": commit.strip(), "dirty": dirty, "source": "git"}
    elif commit := _head_from_files(Path(root)):
        found = {"commit": commit, "dirty": "unknown", "source": "git-files"}
    elif os.environ.get("EIW_GIT_COMMIT"):
        dirty = os.environ.get("EIW_GIT_DIRTY", "unknown").strip().lower() or "unknown"
        found = {"commit": os.environ["EIW_GIT_COMMIT"].strip(), "dirty": dirty, "source": "env"}
    else:
        found = {"commit": "", "dirty": "unknown", "source": "unknown"}
    if os.environ.get("EIW_IMAGE"):
        found["image"] = os.environ["EIW_IMAGE"].strip()
    return found


def code_tags(version: dict[str, str], *, previous_commits: str | None = None) -> dict[str, str]:
    """Run tags for ``code_version()``; ``previous_commits``: the run's ``GIT_COMMITS_TAG`` so far
    (a resumed run keeps the list of every commit that trained it)."""
    tags = {GIT_DIRTY_TAG: version["dirty"], CODE_SOURCE_TAG: version["source"]}
    if version["commit"]:
        tags[GIT_COMMIT_TAG] = version["commit"]
        seen = [c for c in (previous_commits or "").split(",") if c]
        if not seen or seen[-1] != version["commit"]:
            seen.append(version["commit"])
        tags[GIT_COMMITS_TAG] = ",".join(seen)[:5000]
    if version.get("image"):
        tags[IMAGE_TAG] = version["image"]
    return tags


def model_metadata(
    config: dict, version: dict[str, str], datasets: dict[str, ShardDataset]
) -> dict[str, Any]:
    """What a logged model says about its making (MLmodel ``metadata``): the resolved config, the
    code version and each split's dataset name and digest."""
    return {
        "config": config,
        "code": {k: version[k] for k in ("commit", "dirty", "source", "image") if version.get(k)},
        "datasets": {
            context: {"name": d.name, "digest": d.digest, "shards_sha256": d.shards_sha256}
            for context, d in datasets.items()
        },
    }
