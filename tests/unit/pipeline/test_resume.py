"""Checkpoints that recover: an unreadable latest checkpoint falls back to the one before, a resume with
another model section is refused naming the keys, a killed writer's staging dir does not stay.

The plain loop in one process (no Ray) on real shards of the built-in sample set and a real MLflow
sqlite store; Ray's side (``RayRuntime``) with ``ray.train``'s functions replaced, no cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import (
    STATE_FILE,
    CorruptCheckpointError,
    LocalCheckpoints,
    checkpoint_name,
    read_checkpoint,
    read_newest_intact,
    write_checkpoint,
    writer_id,
)
from pipeline.config import TrainConfig, checkpoint_root
from pipeline.config_loading import flatten
from pipeline.data import ensure_data
from pipeline.faults import Faults, InjectedFault
from pipeline.loop import fit
from pipeline.train_state import (
    FREE_ON_RESUME,
    RESUME_CHANGES_TAG,
    RESUME_FALLBACK_TAG,
    check_resume,
    check_resume_config,
    is_fixed_on_resume,
)
from tests.unit.pipeline.tiny_run import CONFIGS, local_overrides, tiny_config

ROOT = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_ready(workdir) -> Path:
    cfg = tiny_config(workdir)
    ensure_data(cfg.data, cfg.model.image_shape)
    return workdir


def crashed_run(workdir: Path, name: str, *more: str, fail_at: int) -> tuple[TrainConfig, Path]:
    """A run that checkpoints every 2 steps and dies right before step ``fail_at``."""
    cfg = tiny_config(workdir, f"run.name={name}", "run.checkpoint_every=2", *more)
    with pytest.raises(InjectedFault):
        fit(cfg, faults=Faults(fail_at_step=fail_at))
    return cfg, checkpoint_root(cfg) / cfg.run.name


def full_state(step: int) -> dict:
    return {
        "step": step, "model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "rng": [],
        "config": {}, "mlflow_run_id": None, "skipped_steps": 0, "test_bits_per_dim": 1.0,
    }  # fmt: skip


# ------------------------------------------------------------------------- unreadable checkpoints
def test_read_newest_intact_passes_over_empty_truncated_and_incomplete_checkpoints(tmp_path):
    good = write_checkpoint(tmp_path / checkpoint_name(2), full_state(2), "")
    incomplete = write_checkpoint(tmp_path / checkpoint_name(4), {"step": 4}, "")
    truncated = write_checkpoint(tmp_path / checkpoint_name(6), full_state(6), "")
    data = (truncated / STATE_FILE).read_bytes()
    (truncated / STATE_FILE).write_bytes(data[: len(data) // 2])
    empty = write_checkpoint(tmp_path / checkpoint_name(8), full_state(8), "")
    (empty / STATE_FILE).write_bytes(b"")

    with pytest.raises(CorruptCheckpointError, match=r"checkpoint_000000006/state\.pt: unreadable.*zip"):
        read_checkpoint(truncated)
    found = read_newest_intact([empty, truncated, incomplete, good])
    assert found is not None and found.directory == good and found.state["step"] == 2
    assert [u.split(":")[0] for u in found.unreadable] == [
        str(empty / STATE_FILE), str(truncated / STATE_FILE), str(incomplete / STATE_FILE)
    ]  # fmt: skip
    assert "empty file" in found.unreadable[0] and "no model" in found.unreadable[2]
    with pytest.raises(ValueError, match="no intact checkpoint") as info:
        read_newest_intact([empty, truncated])
    assert str(empty / STATE_FILE) in str(info.value) and str(truncated / STATE_FILE) in str(info.value)
    assert read_newest_intact([]) is None


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(data_ready, caplog):
    cfg, run_dir = crashed_run(data_ready, "truncated", fail_at=7)  # checkpoints at steps 4 and 6
    latest = run_dir / checkpoint_name(6) / STATE_FILE
    run_id = read_checkpoint(latest.parent)["mlflow_run_id"]
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that filled up, a copy cut short

    with caplog.at_level(logging.WARNING, logger="pipeline.train_state"):
        result = fit(cfg, faults=Faults(fail_at_step=7))  # the fault marker keeps it from firing again
    assert result.step == 8 and result.mlflow_run_id == run_id
    assert any(
        str(latest) in r.getMessage() and "checkpoint_000000004" in r.getMessage() for r in caplog.records
    )
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id)
    assert run.data.tags["pipeline.resumed_from_step"] == "4"
    assert str(latest) in run.data.tags[RESUME_FALLBACK_TAG]
    assert "resumed from checkpoint_000000004" in run.data.tags[RESUME_FALLBACK_TAG]
    # Step 6 was reached again and its checkpoint replaced by an intact one.
    assert read_checkpoint(run_dir / checkpoint_name(6))["step"] == 6
    assert read_checkpoint(run_dir / checkpoint_name(8))["step"] == 8
    mlflow.end_run()


def test_no_intact_checkpoint_is_an_error_naming_each_path(data_ready):
    cfg, run_dir = crashed_run(data_ready, "all-broken", fail_at=5)  # checkpoints at 2 and 4
    for step in (2, 4):
        (run_dir / checkpoint_name(step) / STATE_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="no intact checkpoint") as info:
        fit(cfg)
    for step in (2, 4):
        assert str(run_dir / checkpoint_name(step) / STATE_FILE) in str(info.value)
    with pytest.raises(ValueError, match="no intact checkpoint"):
        check_resume(cfg)  # the driver's check (Ray) says the same before any worker starts


# -------------------------------------------------------------------------- the config on resume
def test_a_changed_model_section_is_refused_with_the_differing_keys(data_ready):
    cfg, run_dir = crashed_run(data_ready, "changed-model", fail_at=3)  # a checkpoint at step 2
    before = (run_dir / checkpoint_name(2) / STATE_FILE).read_bytes()

    changed = tiny_config(
        data_ready, "run.name=changed-model", "run.checkpoint_every=2", "model.num_steps=3",
        "model.split.strategy=static",
    )  # fmt: skip
    with pytest.raises(ValueError, match="cannot resume") as info:
        fit(changed)
    message = str(info.value)
    differ = message.split("these differ: ")[1].split(". ")[0]
    assert differ == 'model.num_steps: 2 -> 3, model.split.strategy: "eiw" -> "static"'  # those, only
    assert str(run_dir / checkpoint_name(2)) in message and "run.name" in message
    with pytest.raises(ValueError, match=r"model\.num_steps: 2 -> 3"):
        check_resume(changed)  # the driver's check, before Ray starts workers

    # n_bits is part of the model: 5-bit bits/dim must not continue an 8-bit run (nor reach its champion).
    with pytest.raises(ValueError, match="model.n_bits: 8 -> 5"):
        fit(tiny_config(data_ready, "run.name=changed-model", "run.checkpoint_every=2", "model.n_bits=5"))
    with pytest.raises(ValueError, match='optim.name: "adam" -> "adamax"'):
        fit(tiny_config(data_ready, "run.name=changed-model", "run.checkpoint_every=2", "optim.name=adamax"))
    assert (run_dir / checkpoint_name(2) / STATE_FILE).read_bytes() == before  # nothing was touched


def test_optimizer_and_run_changes_resume_take_effect_and_are_logged(data_ready, caplog):
    cfg, run_dir = crashed_run(data_ready, "changed-optim", fail_at=3)  # a checkpoint at step 2
    run_id = read_checkpoint(run_dir / checkpoint_name(2))["mlflow_run_id"]
    changed = tiny_config(
        data_ready, "run.name=changed-optim", "run.checkpoint_every=2", "optim.lr=5e-4",
        "optim.betas=[0.8, 0.99]", "run.epochs=3", "data.batch_size=4",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline.train_state"):
        result = fit(changed)
    assert result.step == 12 and result.mlflow_run_id == run_id
    tag = MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id).data.tags[RESUME_CHANGES_TAG]
    for text in ("optim.lr: 0.001 -> 0.0005", "optim.betas: [0.9, 0.999] -> [0.8, 0.99]",
                 "run.epochs: 2 -> 3", "data.batch_size: 8 -> 4"):  # fmt: skip
        assert text in tag, tag
        assert any(text in r.getMessage() for r in caplog.records)
    # The checkpoint's optimizer carried the old lr and betas; the resumed run used the new ones.
    saved = read_checkpoint(result.checkpoint_path)
    group = saved["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.8, 0.99) and group["initial_lr"] == pytest.approx(5e-4)
    assert saved["scheduler"]["base_lrs"] == [pytest.approx(5e-4)]
    assert saved["config"]["optim"]["lr"] == pytest.approx(5e-4)
    mlflow.end_run()


def test_the_cli_refuses_a_changed_model_in_one_error_line(data_ready, tmp_path):
    crashed_run(data_ready, "cli-model", fail_at=3)
    more = ("run.name=cli-model", "run.checkpoint_every=2", "model.hidden_channels=8")
    changed = local_overrides(data_ready, *more)
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--no-ray", *changed]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.hidden_channels: 16 -> 8" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- stale staging dirs
WRITER = """
import sys, time
from pipeline.checkpoint import LocalCheckpoints
staged = LocalCheckpoints(sys.argv[1], num_to_keep=2).staging(sys.argv[2])
(staged / "state.pt").write_bytes(b"\\0" * 100_000)  # the partial file of a disk that filled up
print(staged, flush=True)
time.sleep(600)
"""


def start_writer(run_dir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """A real process half-way through writing a checkpoint (its staging dir and a partial state.pt)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run_dir), name], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    staged = Path(proc.stdout.readline().strip())
    assert staged.is_dir() and staged.name.startswith(f".tmp-{name}."), staged
    return proc, staged


def test_a_killed_writers_staging_dir_does_not_block_the_next_run(data_ready):
    cfg = tiny_config(data_ready, "run.name=killed-writer")
    run_dir = checkpoint_root(cfg) / cfg.run.name
    killed, stale = start_writer(run_dir, checkpoint_name(4))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    alive, live = start_writer(run_dir, checkpoint_name(6))  # still writing: must be left alone
    legacy = run_dir / f".tmp-{checkpoint_name(2)}.{killed.pid}"  # the name before hosts were named
    legacy.mkdir()
    other = run_dir / ".tmp-notes"  # not a name we give: never touched
    other.mkdir()
    try:
        result = fit(cfg)
        assert result.step == 8
        assert not stale.exists() and not legacy.exists()
        assert live.is_dir() and other.is_dir()
        assert [p.name for p in LocalCheckpoints(run_dir, num_to_keep=2).all()] == [
            checkpoint_name(4), checkpoint_name(8)
        ]  # fmt: skip
    finally:
        alive.kill()
        alive.wait()
    mlflow.end_run()


def test_a_write_that_fails_gives_its_space_back_and_keeps_the_previous_checkpoint(tmp_path):
    from pipeline.runtime import LocalRuntime

    runtime = LocalRuntime(tmp_path / "run", num_to_keep=2, device=torch.device("cpu"))
    runtime.save_checkpoint(
        lambda d: write_checkpoint(d, full_state(2), ""), name=checkpoint_name(2), metrics={}
    )

    def disk_full(directory: Path) -> None:
        (directory / STATE_FILE).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    runtime.save_checkpoint(disk_full, name=checkpoint_name(4), metrics={})  # written in the background
    with pytest.raises(OSError, match="No space left"):
        runtime.flush_checkpoints()
    assert sorted(os.listdir(tmp_path / "run")) == [checkpoint_name(2)]
    assert read_checkpoint(tmp_path / "run" / checkpoint_name(2))["step"] == 2


def test_a_checkpoint_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    store = LocalCheckpoints(tmp_path / "run", num_to_keep=1)
    staged = store.staging(checkpoint_name(4))
    write_checkpoint(staged, {"step": 4}, "")
    store.commit(staged, checkpoint_name(4))
    # A writer re-reaching step 4 was killed between moving the old checkpoint aside and renaming the
    # new one in: its only checkpoint sits under the trash name.
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    host = writer_id().rsplit(".", 1)[0]
    os.replace(store.latest(), tmp_path / "run" / f".tmp-old-{checkpoint_name(4)}.{host}.{dead_pid}")
    (tmp_path / "run" / f".tmp-{checkpoint_name(4)}.{host}.{dead_pid}").mkdir()
    assert store.latest() is None
    store.clean_stale()
    assert store.latest() == tmp_path / "run" / checkpoint_name(4)
    assert read_checkpoint(store.latest())["step"] == 4
    assert sorted(os.listdir(tmp_path / "run")) == [checkpoint_name(4)]


def test_another_hosts_staging_dir_goes_only_once_nothing_was_written_in_it_for_a_day(tmp_path):
    from pipeline import checkpoint

    store = LocalCheckpoints(tmp_path / "run", num_to_keep=1)
    (tmp_path / "run").mkdir()
    old = tmp_path / "run" / f".tmp-{checkpoint_name(2)}.elsewhere.{os.getpid()}"  # another host's
    old.mkdir()
    (old / "state.pt").write_bytes(b"x")
    store.clean_stale()
    assert old.exists()  # a writer on another host may still be at it
    long_ago = time.time() - checkpoint.STALE_AFTER_S - 60
    for p in (old, old / "state.pt"):
        os.utime(p, (long_ago, long_ago))
    store.clean_stale()
    assert not old.exists()


# ------------------------------------------------------------------------------ Ray's side
def test_ray_runtime_falls_back_from_an_unreadable_registered_checkpoint(tmp_path, monkeypatch):
    import ray.train

    from pipeline.ray_adapter import RayRuntime

    run_dir = tmp_path / "checkpoints" / "r"
    for step in (2, 4, 6):
        write_checkpoint(run_dir / checkpoint_name(step), full_state(step), "")
    (run_dir / checkpoint_name(4) / STATE_FILE).write_bytes(b"")
    runtime = RayRuntime.__new__(RayRuntime)
    runtime.rank, runtime.world_size, runtime._run_dir = 0, 1, run_dir
    # Ray restores step 4 (step 6 was persisted but never registered: a node lost in between).
    monkeypatch.setattr(
        ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(run_dir / checkpoint_name(4)))
    )
    with runtime.resume_candidates() as candidates:
        assert [p.name for p in candidates] == [checkpoint_name(4), checkpoint_name(2)]
        found = read_newest_intact(candidates)
    assert found.state["step"] == 2 and checkpoint_name(4) in found.unreadable[0]

    # Re-reaching step 4: Ray still holds a checkpoint by that name, so this one gets another.
    held = [
        SimpleNamespace(checkpoint=ray.train.Checkpoint(str(run_dir / checkpoint_name(s)))) for s in (2, 4)
    ]
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda **kw: held)
    assert runtime._unregistered_name(checkpoint_name(4)) == f"{checkpoint_name(4)}-1"
    assert runtime._unregistered_name(checkpoint_name(6)) == checkpoint_name(6)  # never registered: reused
    assert runtime._unregistered_name(checkpoint_name(8)) == checkpoint_name(8)
    reported = {}
    monkeypatch.setattr(
        ray.train,
        "report",
        # **kw: checkpoint_upload_mode=ASYNC and the upload function (run by Ray's upload thread)
        lambda metrics, checkpoint, checkpoint_dir_name, **kw: reported.update(name=checkpoint_dir_name),
    )
    runtime.save_checkpoint(
        lambda d: write_checkpoint(d, {"step": 4}, ""), name=checkpoint_name(4), metrics={}
    )
    assert reported["name"] == f"{checkpoint_name(4)}-1"


# ------------------------------------------------------------------ what a resume may change
def test_a_new_loss_sigma_and_memory_mode_resume_and_are_logged(data_ready, caplog):
    """loss.sigma and model.memory are not the architecture: a resume takes them (issue 22)."""
    cfg, run_dir = crashed_run(data_ready, "changed-loss", fail_at=3)  # a checkpoint at step 2
    changed = tiny_config(
        data_ready,
        "run.name=changed-loss",
        "run.checkpoint_every=2",
        "loss.sigma=0.5",
        "model.memory=invertible",
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.train_state"):
        result = fit(changed)
    assert result.step == cfg.total_steps
    tag = MlflowClient(cfg.mlflow.tracking_uri).get_run(result.mlflow_run_id).data.tags[RESUME_CHANGES_TAG]
    assert "loss.sigma: 0.001 -> 0.5" in tag and 'model.memory: "standard" -> "invertible"' in tag, tag
    saved = read_checkpoint(result.checkpoint_path)["config"]
    assert saved["loss"]["sigma"] == 0.5 and saved["model"]["memory"] == "invertible"
    mlflow.end_run()


def test_a_checkpoint_saved_with_model_split_sigma_resumes(data_ready):
    """A checkpoint written before sigma moved to loss.sigma: its saved model.split.sigma is read as
    loss.sigma (same value: no change reported; another value: a change, not a refusal)."""
    cfg, run_dir = crashed_run(data_ready, "old-sigma", fail_at=3)
    directory = run_dir / checkpoint_name(2)
    state = read_checkpoint(directory)
    state.pop("format")
    old = state["config"]
    old["model"]["split"]["sigma"] = old.pop("loss")["sigma"]  # the layout before issue 22
    write_checkpoint(directory, state, (directory / "config.yaml").read_text())
    assert check_resume_config(old, cfg, source=directory) == []
    moved = check_resume_config(
        old,
        tiny_config(data_ready, "run.name=old-sigma", "run.checkpoint_every=2", "loss.sigma=0.25"),
        source="x",
    )
    assert moved == ["loss.sigma: 0.001 -> 0.25"]
    result = fit(tiny_config(data_ready, "run.name=old-sigma", "run.checkpoint_every=2"))
    assert result.step == cfg.total_steps and result.mlflow_run_id == state["mlflow_run_id"]  # continued
    mlflow.end_run()


def test_a_checkpoint_saved_with_the_old_flat_lcma_keys_resumes(data_ready):
    """A checkpoint written before each strategy had its own config: its ``lcma_*`` split knobs are
    read as LCMA's own names (no change reported), and a real change of one is still refused."""
    cfg, run_dir = crashed_run(data_ready, "old-lcma", "model.split.strategy=lcma", fail_at=3)
    directory = run_dir / checkpoint_name(2)
    old = read_checkpoint(directory)["config"]
    split = old["model"]["split"]
    for name in ("warmup_steps", "factor_out", "momentum"):  # the layout before issue 22
        split[f"lcma_{name}"] = split.pop(name)
    assert check_resume_config(old, cfg, source=directory) == []
    split["lcma_warmup_steps"] += 1
    with pytest.raises(ValueError, match="model.split.warmup_steps"):
        check_resume_config(old, cfg, source=directory)


def test_every_model_key_is_either_fixed_or_free_on_resume():
    """A new FlowConfig field must be classified: architecture (FIXED_ON_RESUME) or not."""
    keys = [k for k in flatten(TrainConfig().model_dump(mode="json")) if k.startswith("model.")]
    unclassified = [k for k in keys if not is_fixed_on_resume(k) and k not in FREE_ON_RESUME]
    assert unclassified == []
    assert not is_fixed_on_resume("model.memory") and not is_fixed_on_resume("loss.sigma")
    assert is_fixed_on_resume("model.split.strategy") and is_fixed_on_resume("optim.name")
    assert not is_fixed_on_resume("optim.lr") and not is_fixed_on_resume("run.precision")
