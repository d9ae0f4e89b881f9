"""The embedded Ray's Train settings as environment variables: set inside, the caller's own values
win, and everything is put back afterwards (no Ray is started)."""

from __future__ import annotations

import os

from pipeline.ray_adapter import EMBEDDED_RAY_ENV, EMBEDDED_RAY_SYSTEM_CONFIG, embedded_ray_env

KEY = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def test_sets_the_settings_inside_and_removes_them_after(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    with embedded_ray_env():
        assert os.environ[KEY] == EMBEDDED_RAY_ENV[KEY] == "0"
    assert KEY not in os.environ


def test_the_callers_value_wins_and_stays(monkeypatch):
    monkeypatch.setenv(KEY, "1")
    with embedded_ray_env():
        assert os.environ[KEY] == "1"
    assert os.environ[KEY] == "1"


def test_workers_start_at_niceness_zero():
    assert EMBEDDED_RAY_SYSTEM_CONFIG["worker_niceness"] == 0
