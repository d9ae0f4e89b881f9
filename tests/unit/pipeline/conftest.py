"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """One folder per test module for its runs, data and MLflow store (named after the module)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
