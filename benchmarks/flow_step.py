"""Training-step time and peak memory of our Glow against normflows' Glow at the same architecture.

    python -m benchmarks.flow_step [--device cpu|cuda] [--levels 3 --steps 8 --hidden 128]
                                   [--batch 16 --size 32]

One training step = dequantize + forward + bits/dim loss + backward + Adam step. Both models have L
levels of K Glow steps (ActNorm, LU 1x1 conv, affine coupling with sigmoid scale and a
conv3x3-conv1x1-conv3x3 net of the same width) on the same images. Differences that remain are the
libraries' own: normflows' split latents get a learned diagonal Gaussian, ours the conditional Glow
prior (``split_prior=gaussian``, one extra 3x3 conv per split); ``split_prior=standard`` is timed too.

Step times are medians over interleaved rounds in one process (so machine load hits both alike), in
process CPU time on the CPU (wall time on CUDA);
peak memory is measured in a fresh subprocess per model: on CUDA torch.cuda.max_memory_allocated,
on CPU the growth of the process's peak RSS (ru_maxrss) over its RSS after building the model and
running one warm-up step, i.e. the memory a step needs beyond weights, optimizer state and libraries.
normflows is an optional dependency (`pip install normflows`, the `bench` extra).

DenseFlow rows (``--denseflow``, benchmarks/denseflow_authors.py): our ``base: denseflow`` against the
EIW authors' DenseFlow (studying910/EIW-Flow, DIW-Flow/) at the same tiny configuration:

    python -m benchmarks.flow_step --denseflow [--authors-code PATH/DIW-Flow] [--size 16 --batch 8]
        [--units 2 2 1 --layers 1 1 2 --mid 16 16 16 --growth 4] [--checkpoint] [--threads 2]

Step-time ratios are per round (ours / theirs in the same round), reported as median [min, max].

``ours-gaussian-compiled`` is the same model with ``torch.compile`` of the training objective
(flows/objective.py ``training_loss`` of bits/dim and the regulariser; the backward is compiled by
AOTAutograd): compiled once before the timed rounds (minutes on a 2-core CPU; ``--no-compile`` skips).
Its random draws are inductor's, as in training; ``--eager-rng`` compiles with ``fallback_random``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="torch.lu is deprecated")

from benchmarks import denseflow_authors as dense  # noqa: E402
from benchmarks.common import forward_options, run_child, set_cpu_threads, setup_line  # noqa: E402
from benchmarks.memory import saved_for_backward_mib, step_peak_mib  # noqa: E402
from flows import FlowConfig, build_flow, initialize_actnorm, training_loss  # noqa: E402

CHILD_OPTIONS = ("levels", "steps", "hidden", "batch", "size", "threads")  # the parent's, for a child
SIGMA = 1e-3  # the trainer's loss.sigma default (pipeline/config.py LossConfig)


def build_ours(args: argparse.Namespace, split_prior: str, *, compiled: bool = False):
    cfg = FlowConfig(
        image_shape=(3, args.size, args.size),
        num_levels=args.levels,
        num_steps=args.steps,
        hidden_channels=args.hidden,
        split_prior=split_prior,
    )
    model = build_flow(cfg).to(args.device)
    initialize_actnorm(model, images(args).to(args.device))

    def loss_fn(x_uint8: torch.Tensor) -> torch.Tensor:
        return training_loss(model.bits_per_dim(x_uint8), model.regularization(), SIGMA)

    if compiled:  # torch.compile of the training objective (forward + its backward via AOTAutograd)
        # Inductor's own random draws, as the training's compile_objective; --eager-rng times
        # fallback_random (eager's draws, what tests/unit/test_compile.py uses).
        compiled_fn = torch.compile(loss_fn, options={"fallback_random": args.eager_rng})
        start = time.perf_counter()
        compiled_fn(images(args).to(args.device)).backward()  # compiles here, outside the timed rounds
        model.zero_grad(set_to_none=True)
        print(f"  ours-{split_prior}-compiled: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        return model, compiled_fn
    return model, loss_fn


def build_normflows(args: argparse.Namespace):
    """normflows' own Glow recipe (examples/glow.ipynb), unconditional."""
    import normflows as nf

    c, size, levels = 3, args.size, args.levels
    q0, merges, flows = [], [], []
    for i in range(levels):
        level_flows = [
            nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), args.hidden, split_mode="channel", scale=True)
            for _ in range(args.steps)
        ]
        level_flows.append(nf.flows.Squeeze())
        flows.append(level_flows)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), size // 2 ** (levels - i), size // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), size // 2**levels, size // 2**levels)
        q0.append(nf.distributions.DiagGaussian(latent))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False).to(args.device)
    d = c * size * size

    def loss_fn(x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() + torch.rand_like(x_uint8, dtype=torch.float32)) / 256 - 0.5
        nll = -model.log_prob(x, None) + d * torch.log(torch.tensor(256.0))
        return (nll / (d * torch.log(torch.tensor(2.0)))).mean()

    with torch.no_grad():  # normflows' ActNorm initialises on its first forward
        loss_fn(images(args).to(args.device))
    return model, loss_fn


def images(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8)


def make(args: argparse.Namespace, name: str):
    if args.denseflow:
        return dense.make(args, name)
    if name == "normflows":
        return build_normflows(args)
    prior = name.removeprefix("ours-").removesuffix("-compiled")
    return build_ours(args, split_prior=prior, compiled=name.endswith("-compiled"))


def step_fn(model, loss_fn, x):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    args: argparse.Namespace, names: list[str], models: dict | None = None
) -> dict[str, list[float]]:
    """Per-round step times of each model, the models' steps interleaved round by round."""
    x = images(args).to(args.device)
    steps = {}
    for name in names:
        torch.manual_seed(0)
        model, loss_fn = make(args, name)
        if models is not None:
            models[name] = model
        steps[name] = step_fn(model, loss_fn, x)
        for _ in range(args.warmup):
            steps[name]()
    # On the CPU, process CPU time (all threads): on a shared machine wall time mostly measures the
    # other jobs. On CUDA, wall time after a synchronize.
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            sync(args.device)
            t0 = clock()
            steps[name]()
            sync(args.device)
            times[name].append(clock() - t0)
    return times


def peak_memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints the peak memory in MiB of a training step of one model."""
    torch.manual_seed(0)
    x = images(args).to(args.device)
    model, loss_fn = make(args, args.child)
    step = step_fn(model, loss_fn, x)
    step()  # warm-up: optimizer state and allocator caches exist from here on
    saved = saved_for_backward_mib(lambda: loss_fn(x))
    model.zero_grad(set_to_none=True)
    peak = step_peak_mib(step, args.device)
    print(json.dumps({"peak_mib": peak, "saved_mib": saved}))


def peak_memory(args: argparse.Namespace, name: str) -> dict[str, float]:
    argv = ["--child", name, "--device", args.device]
    if args.denseflow:
        return run_child(__spec__.name, argv + dense.child_argv(args))
    rng = ["--eager-rng"] if args.eager_rng else []
    return run_child(__spec__.name, argv + forward_options(args, CHILD_OPTIONS) + rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="Glow steps per level (K)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every model")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (minutes to compile on a CPU)"
    )
    parser.add_argument(
        "--eager-rng",
        action="store_true",
        help="compile with fallback_random (eager's random draws), not the training's inductor draws",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    dense.add_arguments(parser)
    args = parser.parse_args()
    set_cpu_threads(args.threads)
    if args.child:
        peak_memory_child(args)
        return
    if args.denseflow:
        denseflow_table(args)
        return

    names = ["normflows", "ours-gaussian", "ours-standard"]
    if not args.no_compile:
        names.append("ours-gaussian-compiled")
    print(
        setup_line(
            args, L=args.levels, K=args.steps, hidden=args.hidden, batch=args.batch,
            image=f"3x{args.size}x{args.size}",
            compiled_rng="eager (fallback_random)" if args.eager_rng else "inductor",
        )
    )
    times = {n: statistics.median(t) for n, t in time_steps(args, names).items()}
    memory = {n: peak_memory(args, n) for n in names}
    ref_t, ref_m = times["normflows"], memory["normflows"]
    peak_name = "peak alloc MiB" if args.device == "cuda" else "peak RSS+ MiB"
    unit = "step ms (wall)" if args.device == "cuda" else "step CPU ms"
    print(
        f"| model | {unit} | x normflows | x ours eager | {peak_name} | x normflows | saved for backward MiB "
        "| x normflows |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        m = memory[n]
        eager = n.removesuffix("-compiled")
        vs_eager = f"{times[n] / times[eager]:.2f}" if eager in times and eager.startswith("ours") else "-"
        print(
            f"| {n} | {times[n] * 1e3:.1f} | {times[n] / ref_t:.2f} | {vs_eager} | {m['peak_mib']:.1f} | "
            f"{m['peak_mib'] / ref_m['peak_mib']:.2f} | {m['saved_mib']:.1f} | "
            f"{m['saved_mib'] / ref_m['saved_mib']:.2f} |"
        )


def denseflow_table(args: argparse.Namespace) -> None:
    """Ours against the authors' DenseFlow: per-round ratios and memory, one process per peak."""
    args.authors_code = str(dense.locate_authors_code(args.authors_code))
    names = dense.names(args)
    models: dict = {}
    times = time_steps(args, names, models)
    print(
        setup_line(
            args, batch=args.batch, image=f"3x{args.size}x{args.size}", rounds=args.rounds, warmup=args.warmup
        )
    )
    print(dense.describe(args, models))
    memory = {n: peak_memory(args, n) for n in names}
    peak_name = "peak alloc MiB" if args.device == "cuda" else "peak RSS+ MiB"
    unit = "step ms (wall)" if args.device == "cuda" else "step CPU ms"
    print(
        f"| model | {unit} median [min, max] | x theirs, per round: median [min, max] | {peak_name} "
        "| x theirs | saved for backward MiB | x theirs |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in names:
        t, m = times[n], memory[n]
        ref = n.replace("ours-denseflow", "authors")
        row = f"| {n} | {statistics.median(t) * 1e3:.0f} [{min(t) * 1e3:.0f}, {max(t) * 1e3:.0f}] | "
        if ref in times:
            r = [a / b for a, b in zip(t, times[ref], strict=True)]
            q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
            rm = memory[ref]
            row += (
                f"{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] (IQR {q[0]:.2f}-{q[2]:.2f}) | "
                f"{m['peak_mib']:.1f} | {m['peak_mib'] / rm['peak_mib']:.2f} | {m['saved_mib']:.1f} | "
                f"{m['saved_mib'] / rm['saved_mib']:.2f} |"
            )
        else:
            row += f"- | {m['peak_mib']:.1f} | - | {m['saved_mib']:.1f} | - |"
        print(row)


if __name__ == "__main__":
    main()
