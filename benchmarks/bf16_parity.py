"""bf16 autocast vs float32 on trained small Glow and DenseFlow models (CPU): bits/dim and gradients.

    python -m benchmarks.bf16_parity                 # ~5 minutes on the 2-core VM
    python -m benchmarks.bf16_parity --train-steps 20 --batch 8   # a quick look

Each model (a small Glow: affine couplings, Gaussian split prior; a small DenseFlow: dense blocks with
Nystrom attention, cross-unit noise, variational dequantization) is first trained ``--train-steps``
Adamax steps in float32 on deterministic structured images (benchmarks/gpu.py's synthetic images), so
its couplings are no longer the identity. Then, on one fixed batch in train mode (BatchNorm batch
statistics, the same noise: ``torch.manual_seed`` before every forward), it compares three ways of
computing the training loss (flows/objective.py ``training_loss``) and its gradient:

- ``float32``: the reference;
- ``bf16, islands``: CPU bf16 autocast with this code's float32 islands (log-dets, priors, coupling
  scales, the dequantizer's log q, the Nystrom attention between its two convs);
- ``bf16, naive``: the same autocast with the islands removed (the code before issue 20: activations,
  log-dets and scales in whatever dtype autocast leaves, the 1x1 conv's log-det cast to bf16, the
  Nystrom pseudo-inverse in bf16).

Per layer type it prints the relative gradient error ||g - g_fp32|| / ||g_fp32|| over that type's
parameters, and, to explain large errors, the cancellation factor of the float32 gradient,
kappa = (||g_prior|| + ||g_rest||) / ||g_prior + g_rest||, with g_prior the gradient of the latents'
log N(z) and g_rest that of everything else (log-dets, log q). A trained flow's gradient is a small
difference of those two large terms (at an optimum they cancel), so a relative rounding error e in
either term becomes about kappa * e in the gradient: bf16 rounds each value by up to 2^-9 (0.2%), and
with kappa in the tens a 5-40% gradient error follows from correct bf16 arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import flows.bijection
import flows.conditional_coupling
import flows.coupling
import flows.denseflow.block
import flows.denseflow.coupling
import flows.dequantization
import flows.split
from benchmarks.gpu_inputs import synthetic_images
from flows import (
    ActNorm,
    DenseFlowConfig,
    DequantizerConfig,
    FlowConfig,
    InvConv1x1,
    LearnedTopPrior,
    Split,
    SplitConfig,
    build_flow,
    initialize_actnorm,
    training_loss,
)
from flows.bijection import standard_normal_log_prob
from flows.coupling import CouplingNet
from flows.denseflow.attention import NystromAttention, PseudoInverse, _bmm_transposed, iterative_inverse
from flows.denseflow.block import CrossUnitNoise
from flows.denseflow.dense_net import DenseBlock, DenseNetMultihead
from flows.dequantization import VariationalDequantizer


# ------------------------------------------------------------------------------ models
def glow_config(size: int) -> FlowConfig:
    return FlowConfig(
        image_shape=(3, size, size), num_levels=2, num_steps=4, hidden_channels=32, coupling="affine",
        split_prior="gaussian", learn_top_prior=True, split=SplitConfig(strategy="static"),
    )


def denseflow_config(size: int) -> FlowConfig:
    return FlowConfig(
        image_shape=(3, size, size), num_levels=2, base="denseflow", dequantization="variational",
        split_prior="standard", learn_top_prior=True, split=SplitConfig(strategy="static"),
        denseflow=DenseFlowConfig(
            units=(2, 1), layers=(2, 2), mid_channels=(16, 16), growth_rate=4, net_depth=2, net_growth=16,
            attention_landmarks=4,
        ),
        dequantizer=DequantizerConfig(
            num_steps=1, context_channels=8, mid_channels=16, depth=1, growth=8, context_depth=1,
            context_growth=8,
        ),
    )


# Layer types, most specific first: a parameter belongs to the first type whose module holds it.
LAYER_TYPES: tuple[tuple[str, tuple[type[nn.Module], ...]], ...] = (
    ("dequantizer", (VariationalDequantizer,)),
    ("Nystrom attention", (NystromAttention,)),
    ("dense block", (DenseBlock,)),
    ("cross-unit noise", (CrossUnitNoise,)),
    ("coupling nets", (CouplingNet, DenseNetMultihead)),
    ("1x1 conv", (InvConv1x1,)),
    ("actnorm", (ActNorm,)),
    ("split prior", (Split,)),
    ("top prior", (LearnedTopPrior,)),
)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = {}
    taken: set[int] = set()
    for name, types in LAYER_TYPES:
        for module in model.modules():
            if isinstance(module, types):
                for p in module.parameters():
                    if id(p) not in taken:
                        taken.add(id(p))
                        groups.setdefault(name, []).append(p)
    rest = [p for p in model.parameters() if id(p) not in taken]
    if rest:
        groups["other"] = rest
    return groups


# ------------------------------------------------------------------------------ the code before the islands
def _identity(t: Tensor) -> Tensor:
    return t


def _naive_attention(self: NystromAttention, x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    positions, e, m = h * w, self.embed_dim, self.num_landmarks
    q, k, v = self.qkv(x).reshape(n, positions, 3 * e).chunk(3, dim=-1)
    scale = positions**0.5
    q_landmarks = q.reshape(n, m, positions // m, e).mean(dim=-2) / scale
    k_landmarks = k.reshape(n, m, positions // m, e).mean(dim=-2) / scale
    kernel_1 = torch.softmax(_bmm_transposed(q, k_landmarks), dim=-2)
    kernel_2 = torch.softmax(_bmm_transposed(q_landmarks, k_landmarks), dim=-2)
    kernel_3 = torch.softmax(_bmm_transposed(q_landmarks, k), dim=-2)
    out = (kernel_1 @ iterative_inverse(kernel_2)) @ (kernel_3 @ v) + v
    return self.out(out.reshape(n, e, h, w))


def _naive_invconv(self: InvConv1x1, x: Tensor) -> tuple[Tensor, Tensor]:
    w = self.weight().to(x.dtype)
    y = torch.nn.functional.conv2d(x, w[:, :, None, None])
    log_det = (x.shape[2] * x.shape[3]) * self.log_s.sum()
    return y, log_det.to(x.dtype).expand(x.shape[0])


ISLAND_MODULES = (
    flows.bijection, flows.coupling, flows.split, flows.denseflow.coupling, flows.conditional_coupling,
    flows.denseflow.block, flows.dequantization,
)


@contextlib.contextmanager
def without_islands() -> Iterator[None]:
    """The pre-issue-20 code: no ``full_precision`` casts, bf16 Nystrom attention, bf16 1x1 log-det."""
    saved = [(m, m.full_precision) for m in ISLAND_MODULES]
    patches = [
        (NystromAttention, "forward", _naive_attention),
        (PseudoInverse, "forward", lambda self, mat: iterative_inverse(mat, self.num_iterations)),
        (InvConv1x1, "forward", _naive_invconv),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for module, _ in saved:
            module.full_precision = _identity
        for cls, name, fn in patches:
            setattr(cls, name, fn)
        yield
    finally:
        for module, fn in saved:
            module.full_precision = fn
        for cls, name, fn in originals:
            setattr(cls, name, fn)


# ------------------------------------------------------------------------------ measurements
def train(model: nn.Module, images: Tensor, steps: int, batch: int) -> float:
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    value = math.nan
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / max(1, steps // 5))
        model.advance(step)
        optimizer.zero_grad(set_to_none=True)
        loss = training_loss(model.bits_per_dim(images[idx]), model.regularization(), 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
        value = loss.item()
    return value


def terms(model: nn.Module, x_uint8: Tensor) -> tuple[Tensor, Tensor]:
    """(log prior (B,), everything else of log w (B,)) in nats: log w = prior + rest."""
    torch.manual_seed(123)  # dequantization and cross-unit noise: the same draw in every precision
    x, log_q_u = model.dequantize_with_log_q(x_uint8)
    zs, log_det = model.encode(x)
    prior = sum(standard_normal_log_prob(z) for z in zs)
    rest = log_det - log_q_u - model.num_dims * model.cfg.n_bits * math.log(2.0)
    return prior, rest


BF16_OPS = (nn.Conv2d, flows.coupling.ZeroConv2d, InvConv1x1)  # what autocast runs in bf16 here


@contextlib.contextmanager
def bf16_only_in(model: nn.Module, group: str) -> Iterator[None]:
    """Under autocast, keep bf16 only in the convolutions whose parameters belong to ``group``; every
    other conv (and 1x1 conv) runs in float32: attributes the bf16 error to the layers computing it."""
    owner = {id(p): name for name, ps in parameter_groups(model).items() for p in ps}
    patched = []
    for module in model.modules():
        if isinstance(module, BF16_OPS) and owner.get(id(next(module.parameters()))) != group:
            original = module.forward

            def in_float32(*inputs, _original=original):
                with torch.autocast("cpu", enabled=False):
                    return _original(*(t.float() if t.is_floating_point() else t for t in inputs))

            module.forward = in_float32
            patched.append(module)
    saved_invconv = InvConv1x1.forward
    if group == "1x1 conv":  # they run in float32 since issue 20: put the bf16 version back
        InvConv1x1.forward = _naive_invconv
    try:
        yield
    finally:
        InvConv1x1.forward = saved_invconv
        for module in patched:
            del module.forward


def measure(model: nn.Module, x: Tensor, mode: str) -> tuple[Tensor, dict[str, Tensor]]:
    """bits/dim (B,) float64 and the gradient per parameter group under ``mode``: float32, islands,
    naive, or "only:<group>" (islands, bf16 only in that group's convolutions)."""
    if mode == "naive":
        islands = without_islands()
    elif mode.startswith("only:"):
        islands = bf16_only_in(model, mode[5:])
    else:
        islands = contextlib.nullcontext()
    with islands, torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
        prior, rest = terms(model, x)
        bpd = -(prior.float() + rest.float()) / (model.num_dims * math.log(2.0))
        loss = training_loss(bpd, model.regularization(), 0.0)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return bpd.detach().double(), flat_grads(model)


def flat_grads(model: nn.Module) -> dict[str, Tensor]:
    """Each layer type's gradient as one float64 vector (zeros where a parameter got none)."""
    return {
        name: torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten() for p in ps
        ])
        for name, ps in parameter_groups(model).items()
    }


def cancellation(model: nn.Module, x: Tensor) -> dict[str, float]:
    """kappa per group in float32: (||g_prior|| + ||g_rest||) / ||g_prior + g_rest||."""
    out = {}
    parts = []
    for part in (0, 1):
        prior, rest = terms(model, x)
        value = -(prior, rest)[part].mean() / (model.num_dims * math.log(2.0))
        model.zero_grad(set_to_none=True)
        value.backward()
        parts.append(flat_grads(model))
    for name in parts[0]:
        a, b = parts[0][name], parts[1][name]
        total = (a + b).norm()
        out[name] = float((a.norm() + b.norm()) / total) if total > 0 else math.nan
    return out


def relative(g: Tensor, ref: Tensor) -> float:
    scale = ref.norm()
    return float((g - ref).norm() / scale) if scale > 0 else math.nan


def run(name: str, cfg: FlowConfig, args: argparse.Namespace) -> None:
    size = cfg.image_shape[-1]
    images = synthetic_images(args.train_images, size, seed=1)
    batch = synthetic_images(args.batch, size, seed=2)
    model = build_flow(cfg)
    initialize_actnorm(model, images[:32])
    start = time.perf_counter()
    final = train(model, images, args.train_steps, args.batch)
    print(f"\n### {name}: trained {args.train_steps} float32 steps (last loss {final:.3f} bits/dim, "
          f"{time.perf_counter() - start:.0f} s); fixed batch of {args.batch}, train mode\n")
    model.train()
    results = {mode: measure(model, batch, mode) for mode in ("float32", "islands", "naive")}
    kappa = cancellation(model, batch)
    ref_bpd, ref_grads = results["float32"]
    print("| precision | bits/dim | vs float32 (mean) | max abs per image |")
    print("|---|---|---|---|")
    for mode, label in (("float32", "float32"), ("islands", "bf16 autocast, float32 islands"),
                        ("naive", "bf16 autocast, naive (before)")):
        delta = results[mode][0] - ref_bpd
        print(f"| {label} | {results[mode][0].mean():.5f} | {delta.mean():+.2e} | {delta.abs().max():.2e} |")
    print("\n| layer type | parameters | grad error, naive | grad error, islands | kappa (float32) |")
    print("|---|---|---|---|---|")
    for group, ref in ref_grads.items():
        naive = relative(results["naive"][1][group], ref)
        islands = relative(results["islands"][1][group], ref)
        print(f"| {group} | {ref.numel()} | {naive:.1%} | {islands:.1%} | {kappa[group]:.1f} |")
    sources = [g for g in ref_grads if any(isinstance(m, BF16_OPS) for m in _modules_of(model, g))]
    print("\nAttribution: bf16 only in one layer type's convolutions (islands on, every other conv in "
          "float32; the 1x1 conv row puts its pre-issue-20 bf16 conv back)\n")
    print("| bf16 only in | bits/dim vs float32 | grad error, all parameters | "
          + " | ".join(f"grad error, {g}" for g in ref_grads) + " |")
    print("|---|---|---|" + "---|" * len(ref_grads))
    flat_ref = torch.cat(list(ref_grads.values()))
    for source in sources:
        bpd, grads = measure(model, batch, f"only:{source}")
        cells = [f"{relative(grads[g], ref_grads[g]):.1%}" for g in ref_grads]
        print(f"| {source} convs | {(bpd - ref_bpd).mean():+.1e} | "
              f"{relative(torch.cat(list(grads.values())), flat_ref):.1%} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _modules_of(model: nn.Module, group: str) -> list[nn.Module]:
    ids = {id(p) for p in parameter_groups(model)[group]}
    return [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--models", default="glow,denseflow")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        cfg = {"glow": glow_config, "denseflow": denseflow_config}[name](args.size)
        run(name, cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
