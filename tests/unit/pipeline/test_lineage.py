"""pipeline.lineage: which code a run used (git commit and dirty flag, or the image's baked-in
commit), and the lineage a logged model carries."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import lineage
from pipeline.lineage import (
    GIT_COMMIT_TAG,
    GIT_COMMITS_TAG,
    GIT_DIRTY_TAG,
    IMAGE_TAG,
    code_tags,
    code_version,
    model_metadata,
    shard_datasets,
)


def git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_commit_and_dirty_flag_from_git(repo: Path, monkeypatch) -> None:
    monkeypatch.delenv("EIW_IMAGE", raising=False)
    head = git(repo, "rev-parse", "HEAD")
    assert code_version(repo) == {"commit": head, "dirty": "false", "source": "git"}
    (repo / "notes.txt").write_text("untracked files do not make the tree dirty")
    assert code_version(repo)["dirty"] == "false"
    (repo / "code.py").write_text("x = 2\n")
    assert code_version(repo)["dirty"] == "true"


def test_without_the_git_program_the_commit_is_read_from_dot_git(repo: Path, monkeypatch) -> None:
    monkeypatch.setattr(lineage, "_git", lambda *args, cwd: None)  # like the image: no git installed
    head = git(repo, "rev-parse", "HEAD")
    assert code_version(repo)["commit"] == head  # a loose ref
    assert code_version(repo)["source"] == "git-files" and code_version(repo)["dirty"] == "unknown"
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / git(repo, "branch", "--show-current")).exists()
    assert code_version(repo)["commit"] == head  # a packed ref
    git(repo, "checkout", "-q", "--detach")
    assert code_version(repo)["commit"] == head  # a detached HEAD


def test_without_a_checkout_the_image_names_the_code(tmp_path: Path, monkeypatch) -> None:
    for key in ("EIW_GIT_COMMIT", "EIW_GIT_DIRTY", "EIW_IMAGE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no enclosing repository found
    assert code_version(tmp_path) == {"commit": "", "dirty": "unknown", "source": "unknown"}
    assert GIT_COMMIT_TAG not in code_tags(code_version(tmp_path))

    monkeypatch.setenv("EIW_GIT_COMMIT", "abc123")
    monkeypatch.setenv("EIW_GIT_DIRTY", "false")
    monkeypatch.setenv("EIW_IMAGE", "eiw-flow:0.1.0")
    version = code_version(tmp_path)
    assert version == {"commit": "abc123", "dirty": "false", "source": "env", "image": "eiw-flow:0.1.0"}
    tags = code_tags(version)
    assert tags[GIT_COMMIT_TAG] == "abc123" and tags[GIT_DIRTY_TAG] == "false"
    assert tags[IMAGE_TAG] == "eiw-flow:0.1.0"


def test_a_resumed_run_keeps_every_commit_that_trained_it() -> None:
    version = {"commit": "c2", "dirty": "false", "source": "git"}
    assert code_tags(version, previous_commits=None)[GIT_COMMITS_TAG] == "c2"
    assert code_tags(version, previous_commits="c1")[GIT_COMMITS_TAG] == "c1,c2"
    assert code_tags(version, previous_commits="c1,c2")[GIT_COMMITS_TAG] == "c1,c2"


def test_model_metadata_names_config_code_and_data(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        manifest = {
            "source": "sample", "split": split, "resolution": [32, 32], "channels": 3, "n_bits": 8,
            "sample_format": "png", "total": 4, "complete": True,
            "shards": [{"name": f"{split}-000000.tar", "sha256": "0" * 64, "count": 4}],
        }  # fmt: skip
        (tmp_path / split / "manifest.json").write_text(json.dumps(manifest))
    datasets = shard_datasets(tmp_path)
    assert set(datasets) == {"training", "testing"}
    meta = model_metadata({"run": {"name": "x"}}, {"commit": "c", "dirty": "true", "source": "git"}, datasets)
    assert meta["config"] == {"run": {"name": "x"}}
    assert meta["code"] == {"commit": "c", "dirty": "true", "source": "git"}
    assert meta["datasets"]["testing"]["name"] == "sample-32x32-test"
    assert meta["datasets"]["training"]["digest"] == datasets["training"].digest
    json.dumps(meta)  # plain values: MLmodel's YAML holds them
