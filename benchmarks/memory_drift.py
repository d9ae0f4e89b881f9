"""The accuracy side of ``model.memory: invertible`` (run through benchmarks/memory_modes.py):

    python -m benchmarks.memory_modes --drift      # reconstruction error at the ImageNet-64 recipe depth
    python -m benchmarks.memory_modes --paired 300 # standard and invertible trained side by side

What each prints is described in benchmarks/memory_modes.py's docstring (``--drift``, ``--paired``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import photos
from benchmarks.memory import activations_mib
from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm, training_loss
from flows.coupling import AffineCoupling
from flows.invertible import reconstruction_error

SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig)


# ------------------------------------------------------------------------------ drift
@torch.no_grad()
def naive_bf16_error(model, x: torch.Tensor) -> list[float]:
    """Rebuild error when every layer runs under bf16 autocast both ways (the 1x1 conv included)."""
    errors = []
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        for level, steps in enumerate(model.levels):
            x, _ = steps.layers[0](x)  # the squeeze
            level_input = x
            for step in steps.layers[1:]:
                x, _ = step(x)
            rebuilt = x
            for step in reversed(steps.layers[1:]):
                rebuilt = step.inverse(rebuilt)
            errors.append((rebuilt.double() - level_input.double()).abs().max().item())
            if level < len(model.splits):
                split = model.splits[level]
                x = split(x)[0][:, : split.num_keep]
    return errors


def recipe_depth_model(args: argparse.Namespace):
    """The recipe's depth (4 levels x 48 steps, 3x64x64, EIW) at width ``--drift-hidden``, with trained
    weights (``--drift-train`` Adam steps on photo crops, cached in ``--drift-state``) or, with
    ``--drift-train 0``, every coupling's output conv drawn N(0, drift_scale^2)."""
    torch.manual_seed(0)
    cfg = FlowConfig(
        image_shape=(3, 64, 64),
        num_levels=4,
        num_steps=48,
        hidden_channels=args.drift_hidden,
        split=SplitConfig(strategy="eiw"),
    )
    model = build_flow(cfg).to(args.device).train()
    state = Path(args.drift_state) if args.drift_state else None
    if state is not None and state.exists():
        model.load_state_dict(torch.load(state, weights_only=True))
        return model, f"trained weights from {state}"
    if args.drift_train == 0:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, AffineCoupling):
                    w = module.net.conv_out.conv.weight
                    w.copy_(args.drift_scale * torch.randn(w.shape, generator=g).to(w))
        initialize_actnorm(model, photos(16, 64, seed=3).to(args.device))  # every step's input normalised
        return model, f"coupling output convs drawn with std {args.drift_scale}"
    initialize_actnorm(model, photos(16, 64, seed=3).to(args.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(args.drift_train):
        model.advance(step)
        bpd = model.bits_per_dim(photos(args.drift_train_batch, 64, seed=10**5 + step).to(args.device))
        optimizer.zero_grad(set_to_none=True)
        training_loss(bpd, model.regularization(), SIGMA).backward()
        optimizer.step()
        if step % 25 == 0 or step + 1 == args.drift_train:
            print(
                f"train step {step + 1}: bits/dim {bpd.mean().item():.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    if state is not None:
        torch.save(model.state_dict(), state)
    how = f"trained {args.drift_train} Adam steps (lr 1e-3, batch {args.drift_train_batch})"
    return model, f"{how}, last train bits/dim {bpd.item():.3f}"


def drift(args: argparse.Namespace) -> None:
    model, weights = recipe_depth_model(args)
    data = photos(args.drift_batch, 64, seed=1).to(args.device)
    x = model.dequantize(data, generator=torch.Generator().manual_seed(2))
    scales = []
    hooks = [
        m.net.register_forward_hook(lambda _m, _a, h: scales.append(torch.sigmoid(h[:, 1::2] + 2).flatten()))
        for m in model.modules()
        if isinstance(m, AffineCoupling)
    ]
    with torch.no_grad():
        model.encode(x)
    for h in hooks:
        h.remove()
    s = torch.cat(scales)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} recipe depth "
        f"L=4 K=48 hidden={args.drift_hidden} image=3x64x64 batch={args.drift_batch}; {weights}; "
        f"coupling scales min {s.min():.3g}, 1% {s.quantile(0.01):.3g}, median {s.median():.3g}",
        flush=True,
    )
    level_std = []
    with torch.no_grad():
        h = x
        for level, steps in enumerate(model.levels):
            h, _ = steps(h)
            level_std.append(h.std().item())
            if level < len(model.splits):
                h = model.splits[level](h)[0][:, : model.splits[level].num_keep]
    rows = {"float32": reconstruction_error(model, x)}
    print("float32 done", flush=True)
    with torch.autocast(args.device, dtype=torch.bfloat16):
        rows["bf16 autocast (invertible mode: ActNorm, 1x1 conv in fp32)"] = reconstruction_error(model, x)
    print("bf16 done", flush=True)
    rows["bf16 autocast, naive (every layer in bf16)"] = naive_bf16_error(model, x)
    levels = len(level_std)
    print("| precision | " + " | ".join(f"level {i + 1}" for i in range(levels)) + " |")
    print("|---|" + "---|" * levels)
    print("| std of the level's output | " + " | ".join(f"{v:.3g}" for v in level_std) + " |")
    for name, errors in rows.items():
        print(f"| max abs error, {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)

    # What the drift does to the gradients: relative error of each level's parameter gradient against
    # float32 standard backprop (the split, prior and EIW parameters are counted with their level).
    def level_grads(mode: str, amp: bool) -> list[torch.Tensor]:
        model.memory = mode
        model.advance(0)

        def loss() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=amp):
                bpd = model.bits_per_dim(data, generator=torch.Generator().manual_seed(2))
                reg = model.regularization()
            return training_loss(bpd, reg, SIGMA)

        stored[(mode, amp)] = activations_mib(model, loss)
        groups: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        for name, p in model.named_parameters():
            parts = name.split(".")
            level = int(parts[1]) if parts[0] in ("levels", "splits") else levels - 1
            groups[level].append(p.grad.flatten().float())
        return [torch.cat(g) for g in groups]

    stored: dict[tuple[str, bool], float] = {}
    reference = level_grads("standard", amp=False)
    print(
        "| gradient error vs float32 standard | " + " | ".join(f"level {i + 1}" for i in range(levels)) + " |"
    )
    print("|---|" + "---|" * levels)
    for mode, amp in (("invertible", False), ("standard", True), ("invertible", True)):
        grads = level_grads(mode, amp)
        errors = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True)]
        label = f"{mode}, {'bf16 autocast' if amp else 'float32'}"
        print(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)
    level_grads("checkpoint", amp=True)
    level_grads("checkpoint", amp=False)
    print(f"stored activations (MiB, batch {args.drift_batch}; activations grow linearly with the batch):")
    for (mode, amp), mib in sorted(stored.items()):
        print(f"  {mode:10s} {'bf16 autocast' if amp else 'float32':13s} {mib:9.1f}")


# ------------------------------------------------------------------------------ paired training
def paired(args: argparse.Namespace) -> None:
    """standard and invertible from one init_seed, plus standard from another init_seed (the yardstick:
    how much two equally good runs differ), trained on the same batches with the same noise."""
    k = args.steps[0]
    split = SplitConfig(strategy=args.split)
    runs = {
        "standard": ("standard", 0),
        "invertible": ("invertible", 0),
        "standard, rounding-perturbed": ("standard", 0),
        "standard, seed 1": ("standard", 1),
    }
    models, optimizers = {}, {}
    for name, (mode, seed) in runs.items():
        cfg = FlowConfig(
            image_shape=(3, 32, 32), num_levels=args.levels, num_steps=k, hidden_channels=args.hidden,
            split=split, memory=mode, init_seed=seed,
        )  # fmt: skip
        models[name] = build_flow(cfg).to(args.device)
        torch.manual_seed(0)  # initialize_actnorm dequantizes with the global RNG: the same noise for all
        initialize_actnorm(models[name], photos(64, 32, seed=10**6).to(args.device))
        if name.endswith("rounding-perturbed"):  # every weight moved by one float32 rounding (2^-24)
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in models[name].parameters():
                    p.mul_(1 + 2.0**-24 * torch.randn(p.shape, generator=g).sign().to(p))
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-3)
    test = photos(256, 32, seed=10**6 + 1).to(args.device)
    print(
        f"device={args.device} torch={torch.__version__} L={args.levels} K={k} hidden={args.hidden} "
        f"batch={args.batch} 3x32x32 photo crops, split={args.split}, Adam 1e-3, {args.paired} steps"
    )
    print(
        "| steps | " + " | ".join(f"train bits/dim, {name}" for name in runs) + " | invertible - standard |"
    )
    print("|---|" + "---|" * (len(runs) + 1))
    window: dict[str, list[float]] = {m: [] for m in models}
    every = max(1, args.paired // 6)
    for step in range(args.paired):
        batch = photos(args.batch, 32, seed=step).to(args.device)
        for name, model in models.items():
            model.advance(step)
            noise = torch.Generator().manual_seed(step)  # the same dequantization noise in every run
            bpd = model.bits_per_dim(batch, generator=noise)
            loss = training_loss(bpd, model.regularization(), SIGMA)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            window[name].append(bpd.mean().item())
        if (step + 1) % every == 0 or step + 1 == args.paired:
            means = {m: statistics.mean(window[m][-every:]) for m in models}
            print(
                f"| {step + 1 - every + 1}-{step + 1} | "
                + " | ".join(f"{v:.4f}" for v in means.values())
                + f" | {means['invertible'] - means['standard']:+.2e} |",
                flush=True,
            )
    with torch.no_grad():
        test_bpd = {
            m: model.bits_per_dim(test, generator=torch.Generator().manual_seed(0)).mean().item()
            for m, model in models.items()
        }
    diffs = [
        ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
        for a, b in zip(models["standard"].parameters(), models["invertible"].parameters(), strict=True)
    ]
    print(
        "held-out bits/dim (256 crops): "
        + ", ".join(f"{m} {v:.4f}" for m, v in test_bpd.items())
        + f"; invertible - standard {test_bpd['invertible'] - test_bpd['standard']:+.2e}, "
        f"rounding-perturbed - standard "
        f"{test_bpd['standard, rounding-perturbed'] - test_bpd['standard']:+.2e}, seed 1 - seed 0 "
        f"{test_bpd['standard, seed 1'] - test_bpd['standard']:+.2e}; largest parameter difference "
        f"invertible vs standard, relative to the tensor's max: {max(diffs):.2e}"
    )
