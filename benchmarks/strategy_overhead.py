"""Training-step time and peak memory of the EIW Shuffle and LCMA splits against the static split.

    python -m benchmarks.strategy_overhead [--device cpu|cuda] [--levels 3 --steps 8 --hidden 128 --batch 16]

All variants are the same Glow (L levels of K steps, same width, same images); only the split strategy
differs. One training step is what the training loop does: ``model.advance``, dequantize,
forward, loss = ``flows.training_loss``, backward, Adam step. Variants:
- static: Glow's split (the reference); static-again: a second, identical static model (noise floor);
- eiw: the authors' Shuffle, unfrozen (the permutation is recomputed from the generator every step,
  the SE head reads the permuted features and its regulariser back-propagates into the flow);
- eiw-hysteresis: the Shuffle with the hysteresis stabiliser (the order is updated at ``advance``);
- eiw-normalized, eiw-temperature, eiw-entropy: the opt-in forms (``EIW_FORMS``; docs/model.md,
  "Shuffle forms"); the entropy target replaces the SE head by a per-channel variance;
- lcma-measuring: LCMA during warm-up, measuring contributions on every training forward;
- lcma-frozen: LCMA after warm-up (a per-position gather before each split, nothing measured).

Step times are medians over interleaved rounds in one process, so machine load hits all variants
alike; the ratio column is the median over rounds of each variant's time over the static step of the
same round. On CUDA the clock is wall time with synchronisation. On CPU it is the process's CPU time
(time.process_time) with one intra-op thread by default: on a shared machine wall time mostly measures
the other tenants (steps of the same model ranged 3 s to 33 s under load here), while the CPU time a
step consumes is what the strategies change. Peak memory is measured in a fresh subprocess per
variant: on CUDA torch.cuda.max_memory_allocated over the allocation after a warm-up step; on CPU the
growth of the process's peak RSS (ru_maxrss) over its RSS after building the model and one warm-up
step (coarse: the allocator's reuse decides it), so
the exact bytes autograd saves for backward are reported as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import forward_options, run_child, set_cpu_threads, setup_line, table_header
from benchmarks.memory import saved_for_backward_mib, step_peak_mib
from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm, training_loss

SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig)

# static-again: a second static model, timed like the others: its ratio shows the noise floor.
# The EIW forms timed (issue 24): the authors' and the opt-in ones, by their knobs.
EIW_FORMS = {
    "eiw": {},
    "eiw-hysteresis": {"stabilizer": "hysteresis"},
    "eiw-normalized": {"generator_input": "normalized"},
    "eiw-temperature": {"generator_input": "normalized", "target_temperature": 0.01},
    "eiw-entropy": {"generator_input": "normalized", "target": "entropy"},
}
VARIANTS = ["static", "static-again", *EIW_FORMS, "lcma-measuring", "lcma-frozen"]


def images(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8)


def make(args: argparse.Namespace, variant: str):
    """A model for ``variant`` and its training step (a closure with its own Adam)."""
    strategy = variant.split("-")[0]
    knobs = {"lcma": {"warmup_steps": 10**9 if variant == "lcma-measuring" else 2}}.get(strategy, {})
    if strategy == "eiw":
        knobs = EIW_FORMS[variant]
    split = SplitConfig(strategy=strategy, **knobs)
    cfg = FlowConfig(
        image_shape=(3, args.size, args.size),
        num_levels=args.levels,
        num_steps=args.steps,
        hidden_channels=args.hidden,
        split=split,
    )
    model = build_flow(cfg).to(args.device)
    x = images(args).to(args.device)
    initialize_actnorm(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    counter = {"step": 0}

    def step() -> None:
        model.advance(counter["step"])
        loss = training_loss(model.bits_per_dim(x), model.regularization(), SIGMA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counter["step"] += 1

    if variant == "lcma-frozen":
        for _ in range(3):  # measure for 2 steps, freeze at the third advance
            step()
        assert all(bool(s.strategy.frozen) for s in model.splits)
    return model, x, step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Median step seconds per variant, and the median over rounds of time / static time."""
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    steps = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        _, _, steps[variant] = make(args, variant)
        for _ in range(args.warmup):
            steps[variant]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            sync(args.device)
            t0 = clock()
            steps[variant]()
            sync(args.device)
            times[variant].append(clock() - t0)
    ratios = {
        v: statistics.median(t / ref for t, ref in zip(times[v], times["static"], strict=True))
        for v in VARIANTS
    }
    return {v: statistics.median(t) for v, t in times.items()}, ratios


def peak_memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints the peak memory in MiB of a training step of one variant."""
    torch.manual_seed(0)
    model, x, step = make(args, args.child)
    step()  # warm-up: optimizer state and allocator caches exist from here on
    saved = saved_for_backward_mib(
        lambda: training_loss(model.bits_per_dim(x), model.regularization(), SIGMA)
    )
    model.zero_grad(set_to_none=True)
    peak = step_peak_mib(step, args.device)
    print(json.dumps({"peak_mib": peak, "saved_mib": saved}))


def peak_memory(args: argparse.Namespace, variant: str) -> dict[str, float]:
    argv = ["--child", variant, "--device", args.device]
    argv += forward_options(args, ("levels", "steps", "hidden", "batch", "size", "threads"))
    return run_child(__spec__.name, argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="Glow steps per level (K)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_cpu_threads(args.threads, args.device)
    if args.child:
        peak_memory_child(args)
        return

    print(
        setup_line(
            args, L=args.levels, K=args.steps, hidden=args.hidden, batch=args.batch,
            image=f"3x{args.size}x{args.size}", rounds=args.rounds,
        )
    )
    times, ratios = time_steps(args)
    memory = {v: peak_memory(args, v) for v in VARIANTS}
    ref_m = memory["static"]
    step_name = "step ms (wall)" if args.device == "cuda" else "step ms (CPU time)"
    peak_name = "peak alloc MiB" if args.device == "cuda" else "peak RSS+ MiB"
    table_header("split", step_name, "x static", peak_name, "x static", "saved for backward MiB", "x static")
    for v in VARIANTS:
        m = memory[v]
        print(
            f"| {v} | {times[v] * 1e3:.1f} | {ratios[v]:.3f} | {m['peak_mib']:.1f} | "
            f"{m['peak_mib'] / ref_m['peak_mib']:.3f} | {m['saved_mib']:.1f} | "
            f"{m['saved_mib'] / ref_m['saved_mib']:.3f} |"
        )


if __name__ == "__main__":
    main()
