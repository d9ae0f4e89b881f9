"""An ordinary (non-log) training step reads nothing back from the device.

On a CPU "device to host" cannot be observed with torch.cuda.set_sync_debug_mode, so every way a
tensor's value reaches Python (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ``cpu``,
``numpy``, ``__index__``) is patched to count. The one exception is the optimizer's step counter,
which non-capturable Adam keeps on the host by design (on CUDA, ``gpu.fused_optimizer`` makes it a
device tensor that is never read).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flows import initialize_actnorm
from pipeline.config import load_config
from pipeline.metric_window import MetricWindow
from pipeline.runtime import Runtime
from pipeline.step import TrainingObjective, train_step
from pipeline.train_state import NonFiniteLossError, TrainState

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


@pytest.fixture
def reads(monkeypatch):
    seen: list[tuple[str, torch.Tensor]] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def _setup(*overrides: str):
    cfg = load_config(
        CONFIGS / "tiny.yaml", ["model.image_shape=[3,8,8]", "run.max_nonfinite_in_row=2", *overrides]
    )
    torch.manual_seed(0)
    state = TrainState(cfg, torch.device("cpu"))
    initialize_actnorm(state.flow, _images(8, seed=99))
    window = MetricWindow(images_per_step=4, first_window_steps=1)
    objective = TrainingObjective(state.flow)

    def step(i: int, *, poison: bool = False):
        state.flow.advance(state.step)
        result = train_step(
            objective, _images(4, seed=i), state.optimizer, state.scheduler, cfg=cfg, runtime=Runtime(),
            poison=poison,
        )  # fmt: skip
        state.count(result)
        window.add(result)
        return result

    return state, window, step


@pytest.mark.parametrize(
    "split", [["model.split.strategy=eiw"], ["model.split.strategy=lcma", "model.split.lcma_warmup_steps=2"],
              ["model.split.strategy=static"]],
)  # fmt: skip
def test_a_non_log_step_makes_zero_host_reads(split, reads):
    state, window, step = _setup(*split)
    step(0)  # the first step reads EIW's last_step buffer once (after construction or a resume)
    reads.clear()
    step(1)
    step(2, poison=True)  # a skipped step is decided on the device too
    step(3)
    counters = {id(s["step"]) for s in state.optimizer.state.values()}
    device_reads = [(name, tuple(t.shape)) for name, t in reads if id(t) not in counters]
    assert device_reads == []
    # The log step reads: the window's sums and the skip counters (and the patch does count reads).
    state.settle(checkpoint_dir=Path("."))
    metrics, _ = window.close(4, lr=0.0, skipped_total=state.skipped_steps)
    assert state.skipped_steps == 1 and state.scheduler.last_epoch == 3  # 4 steps, 3 updates
    assert math.isfinite(metrics["train/bits_per_dim"])
    assert {"tolist"} <= {name for name, _ in reads}


def test_skips_in_a_row_stop_the_run_at_the_next_settle():
    state, _, step = _setup()
    step(0)
    step(1, poison=True)
    step(2, poison=True)
    step(3)  # an update after the run of skips: the longest run still counts
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row"):
        state.settle(checkpoint_dir=Path("."))


def test_a_fused_adam_skips_in_its_kernel_without_touching_the_weights():
    state, _, step = _setup()
    state.optimizer = torch.optim.Adam(state.flow.parameters(), lr=1e-3, fused=True)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda s: 1.0)
    before = {k: v.clone() for k, v in state.flow.state_dict().items() if v.is_floating_point()}
    assert step(0, poison=True).skipped
    after = state.flow.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(float(s["step"]) == 0 for s in state.optimizer.state.values())
    assert not step(1).skipped
