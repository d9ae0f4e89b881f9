"""One optimisation step and the exact evaluation: the math of training, torch and flows only.

No Ray, MLflow or data loading here (benchmarks/train.py runs these on a machine with only torch).
Loss: ``flows.training_loss``, mean bits/dim plus loss.sigma times the regularizer (the split strategy's;
0 for static splits).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flows import FlowModel, training_loss
from pipeline.config import TrainConfig
from pipeline.runtime import Runtime

log = logging.getLogger(__name__)


class TrainingObjective(nn.Module):
    """x uint8 (B, C, H, W) -> (bits/dim (B,), regularizer ()).

    DDP synchronises gradients through ``forward`` only, so the whole loss computation is one forward.
    """

    def __init__(self, flow: FlowModel) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bpd = self.flow.bits_per_dim(x)
        return bpd, self.flow.regularization()


@dataclass(kw_only=True)
class StepResult:
    """One step's numbers as 0-dim device tensors: reading them is a host synchronisation, so the
    loop accumulates them on the device (``MetricWindow``) and reads them at log steps only."""

    bits_per_dim: Tensor
    regularizer: Tensor
    grad_norm: Tensor
    skipped: Tensor  # bool: no update was applied (identical on every rank)


# ------------------------------------------------------------------------------ optimisation
def global_batch(cfg: TrainConfig) -> int:
    """Images per optimizer step over all workers: ``data.batch_size`` (per worker and micro-batch)
    x ``ray.num_workers`` x ``optim.accumulate``."""
    return cfg.data.batch_size * cfg.ray.num_workers * cfg.optim.accumulate


def learning_rate(cfg: TrainConfig) -> float:
    """The base learning rate this run uses: ``optim.lr``, or its scaled value (``optim.lr_scaling``)
    when the global batch differs from ``optim.reference_batch``; that case always warns, naming both."""
    o, batch = cfg.optim, global_batch(cfg)
    lr = o.lr_for_batch(batch)
    if o.reference_batch is not None and batch != o.reference_batch:
        what = (
            f"optim.lr_scaling={o.lr_scaling}: lr {o.lr:g} -> {lr:g}"
            if o.lr_scaling != "none"
            else f"optim.lr_scaling=none keeps lr {o.lr:g}; optim.lr_scaling=linear or sqrt scales it"
        )
        warnings.warn(
            f"global batch {batch} (data.batch_size {cfg.data.batch_size} x ray.num_workers "
            f"{cfg.ray.num_workers} x optim.accumulate {cfg.optim.accumulate}) differs from the recipe's "
            f"optim.reference_batch {o.reference_batch}; {what}",
            UserWarning,
            stacklevel=2,
        )
    return lr


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, **options) -> torch.optim.Optimizer:
    """Adam or Adamax; ``options``: kernel choices (``fused``, ``foreach``, ``capturable``;
    pipeline/device_settings.py:optimizer_options)."""
    o = cfg.optim
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.Adamax
    return cls(params, lr=learning_rate(cfg), betas=o.betas, weight_decay=o.weight_decay, **options)


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """step -> multiplier of the base lr (``learning_rate``): linear warm-up, then ``optim.schedule``
    (pipeline/config.py OptimConfig): ``exponential`` compounds decay_per_epoch**epoch;
    ``constant_after_warmup`` stays at 1 except each epoch's first step (step > 0), which sees
    decay_per_epoch once, as DenseFlow's two stacked schedulers do."""
    warmup, decay, per_epoch = cfg.optim.warmup_steps, cfg.optim.decay_per_epoch, cfg.data.batches_per_epoch
    compounding = cfg.optim.schedule == "exponential"

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if compounding:
            return ramp * decay ** (step // per_epoch)
        return ramp * (decay if step > 0 and step % per_epoch == 0 else 1.0)

    return factor


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``run.precision`` auto or bf16), plain float32 on CPU."""
    use_bf16 = device.type == "cuda" and cfg.run.precision in ("auto", "bf16")
    if cfg.run.precision == "bf16" and device.type != "cuda":
        log.warning("run.precision=bf16 is only used on GPU; training in float32 on %s", device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_step(
    objective: nn.Module,
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    cfg: TrainConfig,
    runtime: Runtime,
    poison: bool = False,
) -> StepResult:
    """One optimisation step on a uint8 batch (B, C, H, W), with no host synchronisation.

    With ``optim.accumulate`` k the batch holds k micro-batches of ``data.batch_size`` (the per-GPU
    batch); each runs forward and backward in turn (under DDP's ``no_sync`` but the last), and the
    gradients of their mean loss make one optimizer step. The returned bits/dim is their mean.

    The step is skipped (parameters and optimizer state unchanged) if any rank's loss or the global
    gradient norm is non-finite. The decision is a device tensor, the same on every rank (the loss
    flag is all-reduced, the norm is global), applied by ``skippable_step`` without reading it back.
    The scheduler always advances; ``TrainState.settle`` (at log steps) winds it back by the skipped
    steps, so skips do not eat warm-up.
    """
    optimizer.zero_grad(set_to_none=True)
    micro_batches = batch.chunk(cfg.optim.accumulate)
    assert len(micro_batches) == cfg.optim.accumulate, "the loader's batch holds accumulate micro-batches"
    bpd_sum, reg_sum, nonfinite = None, None, None
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP all-reduces the gradients in the last micro-batch's backward only
        with contextlib.nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync():
            with autocast_for(cfg, runtime.device):
                bpd, reg = objective(micro)
            loss = training_loss(bpd, reg, cfg.loss.sigma)
            if poison:
                loss = loss * float("nan")
            (loss / len(micro_batches)).backward()  # equal micro-batches: the mean of their means
        bad = ~torch.isfinite(loss.detach())
        bpd_mean, reg_value = bpd.detach().float().mean(), reg.detach().float()
        nonfinite = bad if nonfinite is None else nonfinite | bad
        bpd_sum = bpd_mean if bpd_sum is None else bpd_sum + bpd_mean
        reg_sum = reg_value if reg_sum is None else reg_sum + reg_value
    params = [p for p in objective.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
    # Every rank must take the same decision; the gradient norm is global already, the loss is not.
    bad = runtime.all_reduce_sum(nonfinite.float().reshape(1))
    skipped = (bad[0] > 0) | ~torch.isfinite(grad_norm.detach())
    skippable_step(optimizer, skipped)
    scheduler.step()
    return StepResult(
        bits_per_dim=bpd_sum / len(micro_batches),
        regularizer=reg_sum / len(micro_batches),
        grad_norm=grad_norm.detach().float(),
        skipped=skipped,
    )


def skippable_step(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` unless the 0-dim bool device tensor ``skip``, decided without reading it.

    An optimizer that takes ``found_inf`` (fused Adam; torch.amp.GradScaler's protocol) skips in its
    kernel. Otherwise the step runs, and parameters and optimizer state are then restored from a
    copy taken before it with ``torch.where`` (exact; non-finite values the step wrote are discarded,
    and state created by this step is restored to its initial zeros). The copy costs about three
    times the parameters' memory for Adam and Adamax. On CUDA the step counters must live on the
    device (``capturable``, which ``gpu.fused_optimizer`` sets), else restoring them copies to the host.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        states = [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params]
    optimizer.step()
    with torch.no_grad():
        for p, old, state in zip(params, saved, states, strict=True):
            p.copy_(torch.where(skip, old, p))
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    before = state.get(key)
                    value.copy_(torch.where(skip, before if before is not None else 0, value))


@torch.no_grad()
def mean_over_test_set(
    flow: FlowModel, batches: Iterable[Tensor], score: Callable[[Tensor], Tensor], *, runtime: Runtime
) -> tuple[float, int]:
    """(mean over every image of every rank's share, count) of ``score(batch) -> (B,)``, in eval mode.

    Sums and counts are reduced in float64, not per-rank means (ranks may hold different counts).
    """
    was_training = flow.training
    flow.eval()
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    try:
        for batch in batches:
            values = score(batch.to(runtime.device, non_blocking=True))
            total[0] += values.double().sum()
            total[1] += values.numel()
    finally:
        flow.train(was_training)
    total_sum, count = runtime.all_reduce_sum(total).tolist()
    count = int(round(count))
    return (total_sum / count if count else float("nan")), count


def evaluate(flow: FlowModel, batches: Iterable[Tensor], *, runtime: Runtime, seed: int) -> tuple[float, int]:
    """Exact test bits/dim over every image of every rank's share: (sum over images / count, count).

    The dequantization noise comes from a generator seeded by (seed, rank), so the number is
    reproducible for a given checkpoint and world size.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + runtime.rank)
    return mean_over_test_set(
        flow, batches, lambda x: flow.bits_per_dim(x, generator=generator), runtime=runtime
    )
