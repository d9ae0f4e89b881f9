"""Training step cost of the plain loop against the Ray Train adapter, interleaved in one run.

    python -m benchmarks.train [--config configs/sample.yaml] [--steps 10] [--rounds 8] [--threads N]
    python -m benchmarks.train --checkpoint-stall [--checkpoint-every 10] [--storage s3://bucket/prefix]

Every arm runs ``pipeline.step.train_step`` (forward, ``flows.training_loss``, backward, grad
clipping, the cross-rank non-finite check, Adam step) on the same model and the same batches (fixed
synthetic uint8 images: throughput does not depend on pixel values), each in its own process with the
same number of torch threads (on CPU). Two phases, each with its own embedded Ray instance and one
``TorchTrainer`` worker (``RayRuntime``, world size 1, no DDP: ``ray.num_workers=1``):

- ``before``: Ray as the adapter started it before (``ray.init`` defaults: workers at niceness 15,
  dashboard, metrics collection, event statistics, Train's preemption watcher);
- ``after``: Ray as the adapter starts it now (``pipeline.ray_adapter.embedded_ray_init`` and
  ``embedded_ray_env``).

In each phase three arms take turns, ``--steps`` steps each per round (the order rotates from round to
round) so that the load of a shared machine hits them alike: the plain loop in a subprocess that never
imports Ray (what ``--no-ray`` runs) while every Ray process is stopped (SIGSTOP: the plain loop on a
machine without Ray, the baseline), the same plain process while Ray idles beside it, and the Ray
worker. Each round gives an arm's median step over the baseline's in that round; the table shows the
median ratio and its range over the rounds. On a CPU the overhead is judged on process CPU time per
step (wall time on a shared machine is mostly the scheduler's choice), on a GPU on wall time. The CPU
that Ray's other processes (raylet, GCS, the Train controller and its helper actors, the driver) take
while an arm runs is reported per step in its own column: it is in no arm's process time, and on a
machine without spare cores it is taken from the training.

Needs only torch and pydantic (and flows/pipeline from this repo): without an importable ``ray`` the
Ray arms are skipped with a message, so it runs on a GPU box that has nothing else. ``--config`` needs
PyYAML; without it the model is the sample config's (3 levels x 4 steps, 64 hidden, batch 32, 32x32).

``--checkpoint-stall`` measures instead how long each checkpoint blocks the plain loop, written in the
training thread (before) and by the background writer (after), and their ratio
(benchmarks/checkpoint_stall.py; no Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import child_env, module_command, pin_openmp_threads

if __name__ == "__main__":
    # Ray starts its workers with OMP_NUM_THREADS set to their CPU count; give this process (and the
    # plain arm) the same OpenMP start-up, or the comparison measures OpenMP's idle threads, not Ray.
    pin_openmp_threads(__spec__.name)

import torch

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm
from pipeline.config import DEFAULT_SPLIT_STRATEGY, DataConfig, RunConfig, TrainConfig
from pipeline.runtime import Runtime
from pipeline.step import TrainingObjective, lr_factor, make_optimizer, train_step

# The arms of a phase (the rows); the plain process runs the first two, the phase's Ray worker the third.
PLAIN_ALONE, PLAIN, RAY = "plain, Ray stopped", "plain, Ray idle", "Ray Train worker"
PLAIN_ONLY = "plain loop"  # --no-ray
PHASES = ("before", "after")
POLL_S = 0.01


class PlainRuntime(Runtime):
    def __init__(self, device: torch.device) -> None:
        self.device = device


def default_config(args: argparse.Namespace) -> TrainConfig:
    if args.config:
        from pipeline.config import load_config

        return load_config(args.config, args.overrides)
    model = FlowConfig(image_shape=(3, 32, 32), num_levels=3, num_steps=4, hidden_channels=64,
                       split=SplitConfig(strategy=DEFAULT_SPLIT_STRATEGY))  # fmt: skip
    return TrainConfig(model=model, data=DataConfig(batch_size=32), run=RunConfig(name="bench"))


def make_batches(cfg: TrainConfig, device: torch.device, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, *cfg.model.image_shape)
    return [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device) for _ in range(count)]


class Trainer:
    """One arm's model, optimizer and step counter; ``run(n)`` times ``n`` steps."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime) -> None:
        torch.manual_seed(0)
        self.cfg, self.runtime, self.step = cfg, runtime, 0
        self.flow = build_flow(cfg.model).to(runtime.device)
        self.batches = make_batches(cfg, runtime.device)
        initialize_actnorm(self.flow, self.batches[0])
        self.objective = runtime.wrap(TrainingObjective(self.flow))
        self.optimizer = make_optimizer(self.flow.parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))

    def run(self, steps: int) -> dict[str, list[float]]:
        """Per step of ``steps``: wall, process-CPU and this thread's CPU seconds, its minor page faults."""
        times: dict[str, list[float]] = {"wall": [], "cpu": [], "thread": [], "faults": []}
        for _ in range(steps):
            self.flow.advance(self.step)
            faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            start, start_cpu, start_thread = time.perf_counter(), time.process_time(), time.thread_time()
            batch = self.batches[self.step % len(self.batches)]
            result = train_step(self.objective, batch, self.optimizer, self.scheduler, cfg=self.cfg,
                                runtime=self.runtime)  # fmt: skip
            result.skipped.item()  # train_step reads nothing back: synchronise the device for the clock
            times["wall"].append(time.perf_counter() - start)
            times["cpu"].append(time.process_time() - start_cpu)
            times["thread"].append(time.thread_time() - start_thread)
            times["faults"].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults)
            self.step += 1
        return times


def _wait_for(path: Path, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def serve_arm(name: str, cfg: TrainConfig, runtime: Runtime, sync: Path, *, warmup: int, steps: int,
              slots: int) -> None:  # fmt: skip
    """Warm up, say ready, then run ``steps`` timed steps whenever the orchestrator says go."""
    trainer = Trainer(cfg, runtime)
    trainer.run(warmup)
    info = {"pid": os.getpid(), "niceness": os.nice(0), "threads": torch.get_num_threads(),
            "thread": threading.current_thread().name}  # fmt: skip
    _write(sync / f"ready-{name}.json", info)
    for r in range(slots):
        _wait_for(sync / f"go-{name}-{r}")
        _write(sync / f"done-{name}-{r}.json", trainer.run(steps))


def _ray_worker(config: dict) -> None:
    from pipeline.ray_adapter import RayRuntime

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    serve_arm(config["name"], config["cfg"], RayRuntime(config["cfg"]), Path(config["sync"]),
              warmup=config["warmup"], steps=config["steps"], slots=config["rounds"])  # fmt: skip


def start_ray(cfg: TrainConfig, args: argparse.Namespace, use_gpu: bool, sync: Path, phase: str):
    """An embedded Ray with the phase's settings and a 1-worker ``TorchTrainer`` fitting in a thread."""
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_adapter import embedded_ray_env, embedded_ray_init

    cpus = max(1, args.threads)
    if phase == "before":
        ray.init(address="local", num_cpus=cpus + 1, log_to_driver=False)  # the adapter's call before
        env = contextlib.nullcontext()
    else:
        embedded_ray_init(cpus + 1, log_to_driver=False)
        env = embedded_ray_env()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "threads": 0 if use_gpu else args.threads, "sync": str(sync),
                           "name": f"ray-{phase}", "steps": args.steps, "rounds": args.rounds,
                           "warmup": args.warmup},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RayRunConfig(name=f"bench-train-{phase}", storage_path=str(sync / "ray")),
    )  # fmt: skip

    def fit() -> None:
        try:
            with env:
                trainer.fit()
        except BaseException as e:
            _write(sync / "ray-failed.json", {"error": repr(e)})

    thread = threading.Thread(target=fit, name="ray-fit", daemon=True)
    thread.start()
    return thread


class OtherCpu:
    """CPU seconds of this process and its descendants other than the arms (Ray's own processes)."""

    def __init__(self, exclude: set[int], *, plain: int) -> None:
        import psutil

        self.psutil, self.exclude, self.plain, self.seen, self.names = psutil, exclude, plain, {}, {}

    def total(self) -> float:
        me = self.psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            if p.pid in self.exclude:
                continue
            try:
                t = p.cpu_times()
                if p.pid not in self.names:
                    cmd = p.cmdline()
                    self.names[p.pid] = (cmd[0].split("/")[-1] if cmd else p.name())[:40]
            except self.psutil.Error:
                continue  # gone: its last reading stays in self.seen
            self.seen[p.pid] = t.user + t.system
        return sum(self.seen.values())

    def stop(self) -> list:
        """SIGSTOP every descendant but the plain arm's process; returns them for ``resume``."""
        stopped = []
        for p in self.psutil.Process().children(recursive=True):
            if p.pid != self.plain:
                try:
                    p.suspend()
                    stopped.append(p)
                except self.psutil.Error:
                    pass
        return stopped

    def resume(self, stopped: list) -> None:
        for p in stopped:
            try:
                p.resume()
            except self.psutil.Error:
                pass

    def by_name_now(self) -> dict[str, float]:
        self.total()
        return self.by_name()

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, seconds in self.seen.items():
            name = "this driver" if pid == os.getpid() else self.names.get(pid, "?")
            out[name] = out.get(name, 0.0) + seconds
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment YAML (model and batch size); needs PyYAML")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every arm (CPU only)")
    parser.add_argument("--no-ray", action="store_true", help="the plain arm only")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between Ray's start and round 1")
    parser.add_argument("--arm-plain", metavar="SYNC_DIR", help=argparse.SUPPRESS)  # the plain subprocess
    parser.add_argument("--arm-slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")
    parser.add_argument("--checkpoint-stall", action="store_true",
                        help="measure the per-checkpoint stall: written in the loop vs the background writer")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="with --checkpoint-stall")
    parser.add_argument("--storage", help="with --checkpoint-stall: checkpoint folder or URI (default: temp)")
    args = parser.parse_args()

    cfg = default_config(args)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(args.threads)
    if args.checkpoint_stall:
        from checkpoint_stall import run as run_checkpoint_stall

        return run_checkpoint_stall(cfg, make_batches(cfg, device), storage=args.storage, steps=args.steps,
                                    every=args.checkpoint_every, warmup=args.warmup, rounds=args.rounds)
    if args.arm_plain:
        serve_arm("plain", cfg, PlainRuntime(device), Path(args.arm_plain), warmup=args.warmup,
                  steps=args.steps, slots=args.arm_slots)  # fmt: skip
        return 0

    m = cfg.model
    print(f"model {m.num_levels}x{m.num_steps} hidden {m.hidden_channels} split {m.split.strategy}, "
          f"batch {cfg.data.batch_size} x {m.image_shape}, device {device}"
          + ("" if use_gpu else f", {args.threads} torch thread(s) per arm")
          + f", {args.rounds} rounds x {args.steps} steps per arm after {args.warmup} warm-up steps"
          )  # fmt: skip
    try:
        import ray
    except ImportError as e:
        print(f"ray is not importable ({e}); only the plain loop runs")
        args.no_ray = True
    phases = ("plain",) if args.no_ray else PHASES
    arms = [PLAIN_ONLY] if args.no_ray else [PLAIN_ALONE, PLAIN, RAY]
    results: dict[tuple[str, str], list[dict]] = {}
    other_cpu: dict[tuple[str, str], list[float]] = {}
    info: dict[str, dict] = {}
    spent: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        sync = Path(tmp)
        slots = args.rounds * len(phases) * (1 if args.no_ray else 2)
        arm_argv = [*sys.argv[1:], "--arm-plain", str(sync), "--arm-slots", str(slots)]
        plain = subprocess.Popen(
            module_command(__spec__.name, arm_argv),
            env=child_env(),
        )
        n_plain = 0
        for phase in phases:
            processes = {PLAIN_ONLY: "plain", PLAIN_ALONE: "plain", PLAIN: "plain", RAY: f"ray-{phase}"}
            ray_thread = None if args.no_ray else start_ray(cfg, args, use_gpu, sync, phase)
            for process in {processes[arm] for arm in arms}:
                _wait_for(sync / f"ready-{process}.json")
                if (sync / "ray-failed.json").exists():
                    raise RuntimeError((sync / "ray-failed.json").read_text())
                info[process] = json.loads((sync / f"ready-{process}.json").read_text())
            time.sleep(0 if args.no_ray else args.settle)  # let Ray's start-up work finish
            other = OtherCpu({info[processes[arm]]["pid"] for arm in arms}, plain=plain.pid)
            start_by_name = other.by_name_now()
            for r in range(args.rounds):
                for k in range(len(arms)):
                    arm = arms[(r + k) % len(arms)]
                    process = processes[arm]
                    if process == "plain":
                        n, n_plain = n_plain, n_plain + 1
                    else:
                        n = r
                    stopped = other.stop() if arm == PLAIN_ALONE else []
                    try:
                        before = other.total()
                        (sync / f"go-{process}-{n}").touch()
                        _wait_for(sync / f"done-{process}-{n}.json")
                        other_cpu.setdefault((phase, arm), []).append((other.total() - before) / args.steps)
                    finally:
                        other.resume(stopped)
                    done = json.loads((sync / f"done-{process}-{n}.json").read_text())
                    results.setdefault((phase, arm), []).append(done | {"process": process})
            spent[phase] = {k: v - start_by_name.get(k, 0.0) for k, v in other.by_name_now().items()}
            if ray_thread is not None:
                ray_thread.join()
                import ray

                ray.shutdown()
        plain.wait()

    for phase in phases:
        report(use_gpu, phase, arms, info, results, other_cpu)
        steps = args.rounds * args.steps * len(arms)
        print(f"{phase}: CPU of the other processes over the timed rounds, ms per timed step (all arms):")
        for name, seconds in sorted(spent[phase].items(), key=lambda kv: -kv[1]):
            if seconds * 1e3 / steps >= 0.05:
                print(f"  {name}: {seconds * 1e3 / steps:.1f}")
    return 0


def report(use_gpu: bool, phase: str, arms: list[str], info: dict, results: dict, other_cpu: dict) -> None:
    """A row per arm of ``phase``: medians over all its timed steps, its per-round ratio to the first arm."""
    med = statistics.median
    # On a GPU the step is bounded by the device: compare wall time. On a CPU, process CPU time per
    # step is the measure that survives a shared, oversubscribed machine.
    key = "wall" if use_gpu else "cpu"
    base = arms[0]

    def ratios(arm: str, k: str) -> list[float]:
        pairs = zip(results[phase, arm], results[phase, base], strict=True)
        return [med(a[k]) / med(b[k]) for a, b in pairs]

    print(f"\nphase {phase}")
    print(
        "| arm | niceness | step ms: wall | CPU, process | CPU, training thread | minor faults per step"
        f" | Ray's other processes, CPU ms per step | {key} vs {base}: median [min, max] over rounds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        rounds = results[phase, arm]
        allsteps = {k: [t for rnd in rounds for t in rnd[k]] for k in ("wall", "cpu", "thread", "faults")}
        wall, cpu, thread, faults = (med(allsteps[k]) for k in ("wall", "cpu", "thread", "faults"))
        r = ratios(arm, key)
        process = info[rounds[0]["process"]]
        other = med(other_cpu[phase, arm])
        print(f"| {arm} ({process['threads']} thread(s)) | {process['niceness']} | {wall * 1e3:.1f} | "
              f"{cpu * 1e3:.1f} | {thread * 1e3:.1f} | {faults:.0f} | {other * 1e3:.1f} | "
              f"{med(r):.3f} [{min(r):.3f}, {max(r):.3f}] |")  # fmt: skip
    if len(arms) == 3:
        pairs = zip(results[phase, RAY], results[phase, PLAIN], strict=True)
        r = [med(a[key]) / med(b[key]) for a, b in pairs]
        print(f"{phase}, {RAY} against {PLAIN}: {(med(r) - 1) * 100:+.1f}% step {key} time "
              f"[{(min(r) - 1) * 100:+.1f}, {(max(r) - 1) * 100:+.1f}]")  # fmt: skip
    for arm in arms[1:]:
        r = ratios(arm, key)
        print(f"{phase}, {arm}: {(med(r) - 1) * 100:+.1f}% step {key} time against {base} "
              f"(rounds: {', '.join(f'{(x - 1) * 100:+.1f}' for x in r)}; target <= +5%)")  # fmt: skip
        if not use_gpu:
            t, w = ratios(arm, "thread"), ratios(arm, "wall")
            print(f"  training thread CPU: {(med(t) - 1) * 100:+.1f}% [{(min(t) - 1) * 100:+.1f}, "
                  f"{(max(t) - 1) * 100:+.1f}]; wall: {(med(w) - 1) * 100:+.1f}% "
                  f"[{(min(w) - 1) * 100:+.1f}, {(max(w) - 1) * 100:+.1f}]")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
