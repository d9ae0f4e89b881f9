"""Training memory and step time of ``model.memory`` = standard / invertible / checkpoint at growing depth.

    python -m benchmarks.memory_modes [--device cpu|cuda] [--steps 4 8 16 32 --levels 3 --hidden 128]
    python -m benchmarks.memory_modes --drift      # reconstruction error at the ImageNet-64 recipe depth
    python -m benchmarks.memory_modes --paired 300 # standard and invertible trained side by side
    python -m benchmarks.memory_modes --recipe-memory configs/imagenet64.yaml  # stored activations

Every model is the same Glow (L levels of K steps, EIW split by default, same width, same images); only
``memory`` and K differ. One training step is what the training loop does: ``model.advance``,
dequantize, forward, loss = ``flows.training_loss`` (bits/dim plus sigma times the regulariser), backward,
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
import json
import os
import statistics
import time

import torch

from benchmarks.common import forward_options, photos, run_child, set_cpu_threads, setup_line, table_header
from benchmarks.memory import activations_mib, saved_for_backward_mib, step_peak_mib
from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm, training_loss

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
    argv += forward_options(args, ("levels", "hidden", "batch", "size", "threads"))
    return run_child(__spec__.name, argv)


def memory_table(args: argparse.Namespace) -> None:
    print(
        setup_line(
            args, L=args.levels, K=args.steps, hidden=args.hidden, batch=args.batch,
            image=f"3x{args.size}x{args.size}", split=args.split, rounds=args.rounds,
        ),
        flush=True,
    )
    # Memory first: a child's ru_maxrss starts at its parent's high-water RSS (Linux carries it over
    # fork and exec), so the children must be started before this process holds the timed models.
    memory = {(mode, k): memory_numbers(args, mode, k) for k in args.steps for mode in MODES}
    times, ratios = time_steps(args)
    step_name = "step ms (wall)" if args.device == "cuda" else "step ms (CPU)"
    peak_name = "peak alloc MiB" if args.device == "cuda" else "peak RSS+ MiB"
    table_header(
        "K", "memory", "parameters MiB", "saved MiB (all)", "activations MiB", "x standard", peak_name,
        "x standard", step_name, "x standard",
    )
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


# ------------------------------------------------------------------------------ recipe memory
def recipe_memory(args: argparse.Namespace, config: str) -> None:
    """Stored activations (forward only, parameters excluded) of a recipe config's model at batch
    ``--recipe-batch`` in float32 and under bf16 autocast, per memory mode; linear in the batch."""
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
    set_cpu_threads(args.threads, args.device)
    if args.child:
        memory_child(args)
    elif args.drift:
        from memory_drift import drift

        drift(args)
    elif args.paired:
        from memory_drift import paired

        paired(args)
    elif args.recipe_memory:
        recipe_memory(args, args.recipe_memory)
    else:
        memory_table(args)


if __name__ == "__main__":
    main()
