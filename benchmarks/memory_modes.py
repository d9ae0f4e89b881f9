"""Training memory and step time of ``model.memory`` = standard / invertible / checkpoint at growing depth.

    python benchmarks/memory_modes.py [--device cpu|cuda] [--steps 4 8 16 32 --levels 3 --hidden 128]
    python benchmarks/memory_modes.py --drift      # reconstruction error at the ImageNet-64 recipe depth
    python benchmarks/memory_modes.py --paired 300 # standard and invertible trained side by side
    python benchmarks/memory_modes.py --recipe-memory configs/imagenet64.yaml  # stored activations

Every model is the same Glow (L levels of K steps, EIW split by default, same width, same images); only
``memory`` and K differ. One training step is what the training loop does: ``model.advance``,
dequantize, forward, loss = ``flows.training_loss`` (bits/dim + sigma * regularization()), backward,
Adam step.

Columns (one run, one table):
- saved for backward: the bytes of the unique storages autograd keeps between forward and backward
  (``saved_tensors_hooks``), once with everything (benchmarks/memory.py, comparable to the other
  tables) and once without the parameters' own storages, which exist whatever autograd does: the
  stored activations. For ``checkpoint`` this is what the checkpoint keeps (each level's input);
  what it recomputes during backward shows up only in the peak.
- peak: in a fresh subprocess per (mode, K), started before anything is timed: on CUDA
  ``max_memory_allocated`` during a step over the allocation after a warm-up step; on CPU the growth
  of peak RSS over RSS after one warm-up step, with glibc's mmap threshold fixed
  (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave RSS. It includes backward's transient
  tensors and the parameters' gradients (the step starts with ``zero_grad(set_to_none=True)``), which
  grow with K in every mode (the parameters column).
- step time: medians over interleaved rounds in one process (every mode and depth once per round), so
  machine load hits them alike; the ratio is the median over rounds of time / standard time at the same
  K in the same round. CPU clock = process CPU time with one intra-op thread (wall time on a shared
  machine measures the other tenants); CUDA clock = synchronised wall time.

``--drift``: max |x - x_rebuilt| per level over the level's input, rebuilt from the level's output through
K inverses exactly as invertible mode's backward does (``flows.invertible.reconstruction_error``), at the
recipe's depth (4 levels x 48 steps, 512 hidden, 3x64x64, EIW split) in float32 and under bf16
autocast, plus a "naive bf16" row: every layer under autocast, as standard mode computes it (the 1x1
conv in bf16). Then what it does to gradients: per level, the relative error ||g - g_ref|| / ||g_ref||
of the parameter gradient against float32 standard backprop, for invertible in float32, standard under
bf16 autocast (bf16's own error, the yardstick) and invertible under bf16 autocast.
Weights: each coupling's zero-initialised output conv drawn N(0, drift_scale^2) so that the couplings
are far from the identity (a stand-in for trained weights; the script prints the range of the coupling
scales it produced), then ActNorm initialised on the images.

``--recipe-memory CONFIG``: the stored activations (bytes autograd keeps after the forward pass,
parameters excluded) of a recipe config's model, per memory mode, in float32 and under bf16 autocast,
measured at a small batch and scaled linearly to the config's per-GPU batch.

``--paired N``: standard and invertible models from one init_seed, a standard one whose weights are
moved by one float32 rounding (how far any rounding difference carries: Adam amplifies them), and a
standard one from another init_seed (how much two equally good runs differ: the noise), trained N
Adam steps on the same batches with the same dequantization noise (32x32 crops of scikit-image's
photographs, or noise without it); prints train bits/dim along the way, held-out bits/dim at the end,
and the largest parameter difference between the paired runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import run_child, saved_for_backward_mib, step_peak_mib  # noqa: E402

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm, training_loss  # noqa: E402
from flows.coupling import AffineCoupling  # noqa: E402
from flows.invertible import reconstruction_error  # noqa: E402

SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig)

MODES = ["standard", "invertible", "checkpoint"]


def images(args: argparse.Namespace, n: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n or args.batch, 3, args.size, args.size)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def make(args: argparse.Namespace, mode: str, steps: int):
    """A model and its training step (a closure with its own Adam) for one memory mode and depth."""
    split = SplitConfig(strategy=args.split)
    cfg = FlowConfig(
        image_shape=(3, args.size, args.size),
        num_levels=args.levels,
        num_steps=steps,
        hidden_channels=args.hidden,
        split=split,
        memory=mode,
    )
    model = build_flow(cfg).to(args.device)
    x = images(args).to(args.device)
    initialize_actnorm(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    counter = {"step": 0}

    def loss() -> torch.Tensor:
        return training_loss(model.bits_per_dim(x), model.regularization(), SIGMA)

    def step() -> None:
        model.advance(counter["step"])
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        counter["step"] += 1

    return model, loss, step


def activations_mib(model: torch.nn.Module, loss_fn) -> float:
    """Like ``saved_for_backward_mib`` but without the parameters' storages (they exist anyway)."""
    return saved_for_backward_mib(loss_fn, exclude_parameters_of=model)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace) -> tuple[dict, dict]:
    """Median step seconds per (mode, K), and the median over rounds of time / standard time at K."""
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    keys = [(mode, k) for k in args.steps for mode in MODES]
    steps = {}
    for key in keys:
        steps[key] = make(args, *key)[2]
        for _ in range(args.warmup):
            steps[key]()
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for _ in range(args.rounds):
        for key in keys:
            sync(args.device)
            t0 = clock()
            steps[key]()
            sync(args.device)
            times[key].append(clock() - t0)
    ratios = {
        (mode, k): statistics.median(
            t / ref for t, ref in zip(times[(mode, k)], times[("standard", k)], strict=True)
        )
        for mode, k in keys
    }
    return {key: statistics.median(t) for key, t in times.items()}, ratios


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: the memory numbers of one (mode, K), as a JSON line."""
    mode, k = args.child.split(":")
    torch.manual_seed(0)
    model, loss, step = make(args, mode, int(k))
    step()  # warm-up: optimizer state and allocator caches exist from here on
    saved = saved_for_backward_mib(loss)
    activations = activations_mib(model, loss)
    model.zero_grad(set_to_none=True)
    peak = step_peak_mib(step, args.device)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        json.dumps(
            {"peak_mib": peak, "saved_mib": saved, "activations_mib": activations, "params_mib": params}
        )
    )


def memory_numbers(args: argparse.Namespace, mode: str, k: int) -> dict[str, float]:
    # glibc otherwise raises its mmap threshold after the first large free and keeps freed blocks in
    # the heap, so the warm-up step's memory is reused and a step's peak barely shows in RSS. A fixed
    # threshold returns every large block on free: RSS then follows the live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    argv = ["--child", f"{mode}:{k}", "--device", args.device, "--split", args.split]
    for key in ("levels", "hidden", "batch", "size", "threads"):
        argv += [f"--{key}", str(getattr(args, key))]
    return run_child(__file__, argv)


def memory_table(args: argparse.Namespace) -> None:
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"L={args.levels} K={args.steps} hidden={args.hidden} batch={args.batch} "
        f"image=3x{args.size}x{args.size} split={args.split} rounds={args.rounds}",
        flush=True,
    )
    # Memory first: a child's ru_maxrss starts at its parent's high-water RSS (Linux carries it over
    # fork and exec), so the children must be started before this process holds the timed models.
    memory = {(mode, k): memory_numbers(args, mode, k) for k in args.steps for mode in MODES}
    times, ratios = time_steps(args)
    step_name = "step ms (wall)" if args.device == "cuda" else "step ms (CPU)"
    peak_name = "peak alloc MiB" if args.device == "cuda" else "peak RSS+ MiB"
    print(
        f"| K | memory | parameters MiB | saved MiB (all) | activations MiB | x standard | {peak_name} "
        f"| x standard | {step_name} | x standard |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in args.steps:
        ref = memory[("standard", k)]
        for mode in MODES:
            m = memory[(mode, k)]
            print(
                f"| {k} | {mode} | {m['params_mib']:.1f} | {m['saved_mib']:.1f} | "
                f"{m['activations_mib']:.1f} | "
                f"{m['activations_mib'] / ref['activations_mib']:.3f} | {m['peak_mib']:.1f} | "
                f"{m['peak_mib'] / ref['peak_mib']:.3f} | {times[(mode, k)] * 1e3:.0f} | "
                f"{ratios[(mode, k)]:.3f} |",
                flush=True,
            )


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


# ------------------------------------------------------------------------------ recipe memory
def recipe_memory(args: argparse.Namespace, config: str) -> None:
    """Stored activations (forward only, parameters excluded) of a recipe config's model at batch
    ``--recipe-batch`` in float32 and under bf16 autocast, per memory mode; linear in the batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.config import load_config

    cfg = load_config(config)
    model = build_flow(cfg.model).to(args.device).train()
    c, h, w = cfg.model.image_shape
    data = photos(args.recipe_batch, h, seed=1).to(args.device)
    initialize_actnorm(model, data)
    model.advance(0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per_image = cfg.data.batch_size / args.recipe_batch
    print(
        f"{config}: L={cfg.model.num_levels} K={cfg.model.num_steps} hidden={cfg.model.hidden_channels} "
        f"{c}x{h}x{w}, measured at batch {args.recipe_batch}, scaled to the recipe's batch "
        f"{cfg.data.batch_size} per GPU"
    )
    print(f"| memory | precision | stored activations MiB, batch {cfg.data.batch_size} |")
    print("|---|---|---|")
    for mode in MODES:
        model.memory = mode
        for amp in (False, True):
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
                if t.untyped_storage().data_ptr() not in params:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=amp):
                    loss = training_loss(model.bits_per_dim(data), model.regularization(), 1.0)
            del loss  # the graph goes; nothing is back-propagated
            mib = sum(storages.values()) / 2**20 * per_image
            print(f"| {mode} | {'bf16 autocast' if amp else 'float32'} | {mib:.0f} |", flush=True)


# ------------------------------------------------------------------------------ paired training
@functools.cache
def _pictures() -> list[torch.Tensor]:
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    return [
        torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).contiguous()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    ]


def photos(n: int, size: int, seed: int) -> torch.Tensor:
    """n random size x size crops of scikit-image's bundled photographs (uint8), noise without it."""
    g = torch.Generator().manual_seed(seed)
    pictures = _pictures()
    if not pictures:
        return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    out = []
    for _ in range(n):
        pic = pictures[int(torch.randint(len(pictures), (1,), generator=g))][:3]
        top = int(torch.randint(pic.shape[1] - size, (1,), generator=g))
        left = int(torch.randint(pic.shape[2] - size, (1,), generator=g))
        out.append(pic[:, top : top + size, left : left + size])
    return torch.stack(out)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32], help="steps per level (K)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--split", default="eiw")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--drift", action="store_true", help="reconstruction error at the recipe depth")
    parser.add_argument("--drift-batch", type=int, default=2)
    parser.add_argument("--drift-scale", type=float, default=0.02)
    parser.add_argument("--drift-hidden", type=int, default=512)
    parser.add_argument("--drift-train", type=int, default=0, help="Adam steps before measuring drift")
    parser.add_argument("--drift-train-batch", type=int, default=8)
    parser.add_argument("--drift-state", default=None, help="cache of the trained weights (.pt)")
    parser.add_argument("--paired", type=int, default=0, help="train standard and invertible N steps")
    parser.add_argument("--recipe-memory", default=None, help="a recipe config: its stored activations")
    parser.add_argument("--recipe-batch", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
    elif args.drift:
        drift(args)
    elif args.paired:
        paired(args)
    elif args.recipe_memory:
        recipe_memory(args, args.recipe_memory)
    else:
        memory_table(args)


if __name__ == "__main__":
    main()
