"""Training throughput of the plain loop against the Ray Train adapter with one worker, in one run.

    python benchmarks/train.py [--config configs/sample.yaml] [--steps 30] [--rounds 3] [--threads N]

Both paths run ``pipeline.step.train_step`` (forward, bits/dim + sigma * regularizer, backward,
grad clipping, the cross-rank non-finite check, Adam step) on the same model and the same batches
(fixed synthetic uint8 images: throughput does not depend on pixel values). The plain path runs in
this process; the Ray path runs the identical code in one ``TorchTrainer`` worker through
``RayRuntime``. Both get the same device and the same number of torch threads (on CPU), and each
measures per-step wall and process-CPU times after a warm-up. Plain rounds run before and after the
Ray rounds so that drifting machine load hits both; the table reports medians. The overhead is
judged on wall time on a GPU and on process CPU time per step on a CPU (robust to a shared machine);
the training thread's own CPU time separates the step itself from Ray's background threads.

Needs only torch and pydantic (and flows/pipeline from this repo): without an importable ``ray`` the
Ray half is skipped with a message, so it runs on a GPU box that has nothing else. ``--config`` needs PyYAML;
without it the model is the sample config's (3 levels x 4 steps, 64 hidden, batch 32, 32x32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "OMP_NUM_THREADS" not in os.environ:
    # Ray starts its workers with OMP_NUM_THREADS set to their CPU count; give this process (the plain
    # half) the same OpenMP start-up, or the comparison measures OpenMP's idle threads, not Ray.
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--threads", type=int, default=1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _pre.parse_known_args()[0].threads))
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm  # noqa: E402
from pipeline.config import DEFAULT_SPLIT_STRATEGY, DataConfig, RunConfig, TrainConfig  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402
from pipeline.step import TrainingObjective, lr_factor, make_optimizer, train_step  # noqa: E402


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


def time_steps(
    cfg: TrainConfig, runtime: Runtime, *, steps: int, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Per-step wall and process-CPU seconds of ``train_step`` for ``rounds`` x ``steps`` steps after
    ``warmup`` steps."""
    torch.manual_seed(0)
    device = runtime.device
    flow = build_flow(cfg.model).to(device)
    batches = make_batches(cfg, device)
    initialize_actnorm(flow, batches[0])
    objective = runtime.wrap(TrainingObjective(flow))
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    times: dict[str, list[float]] = {"wall": [], "cpu": [], "thread": []}
    for i in range(warmup + rounds * steps):
        flow.advance(i)
        start, start_cpu, start_thread = time.perf_counter(), time.process_time(), time.thread_time()
        train_step(objective, batches[i % len(batches)], optimizer, scheduler, cfg=cfg, runtime=runtime)
        if i >= warmup:  # train_step reads its results back, so the device is synchronised here
            times["wall"].append(time.perf_counter() - start)
            times["cpu"].append(time.process_time() - start_cpu)
            times["thread"].append(time.thread_time() - start_thread)
    return times


def _ray_worker(config: dict) -> None:
    import ray.train

    from pipeline.ray_adapter import RayRuntime

    cfg = config["cfg"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    times = time_steps(cfg, RayRuntime(cfg), steps=config["steps"], rounds=config["rounds"],
                       warmup=config["warmup"])  # fmt: skip
    med = statistics.median
    metrics = {"wall_s": med(times["wall"]), "cpu_s": med(times["cpu"]), "thread_s": med(times["thread"]),
               "threads": torch.get_num_threads()}  # fmt: skip
    # Ray keeps only the metrics that come with a checkpoint; this one holds them as JSON.
    with tempfile.TemporaryDirectory() as d:
        Path(d, "times.json").write_text(json.dumps(times))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def time_ray(cfg: TrainConfig, args: argparse.Namespace, use_gpu: bool, tmp: Path) -> dict | None:
    try:
        import ray
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        print(f"ray is not importable ({e}); skipping the Ray adapter half")
        return None
    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg, "threads": args.threads if not use_gpu else 0,
                               "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": max(1, args.threads)}),
            run_config=RayRunConfig(name="bench-train", storage_path=str(tmp)),
        )  # fmt: skip
        return dict(trainer.fit().metrics)
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment YAML (model and batch size); needs PyYAML")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in both paths (CPU only)")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")
    args = parser.parse_args()

    cfg = default_config(args)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(args.threads)
    m = cfg.model
    print(f"model {m.num_levels}x{m.num_steps} hidden {m.hidden_channels} split {m.split.strategy}, "
          f"batch {cfg.data.batch_size} x {m.image_shape}, device {device}"
          + ("" if use_gpu else f", {args.threads} torch thread(s)"))  # fmt: skip

    half = max(1, args.rounds // 2 + args.rounds % 2)
    before = time_steps(cfg, PlainRuntime(device), steps=args.steps, rounds=half, warmup=args.warmup)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ray_metrics = time_ray(cfg, args, use_gpu, Path(tmp))
    after = time_steps(cfg, PlainRuntime(device), steps=args.steps, rounds=half, warmup=args.warmup)

    batch = cfg.data.batch_size
    both = {k: before[k] + after[k] for k in before}
    med = statistics.median
    rows = [
        ("plain loop, before the Ray half", med(before["wall"]), med(before["cpu"]), med(before["thread"])),
        ("plain loop, after the Ray half", med(after["wall"]), med(after["cpu"]), med(after["thread"])),
        ("plain loop (both)", med(both["wall"]), med(both["cpu"]), med(both["thread"])),
    ]
    if ray_metrics is not None:
        name = f"Ray Train adapter, 1 worker ({ray_metrics['threads']} thread(s))"
        rows.append((name, ray_metrics["wall_s"], ray_metrics["cpu_s"], ray_metrics["thread_s"]))
    # On a GPU the step is bounded by the device: compare wall time. On a CPU, process CPU time per
    # step is the measure that survives a shared, oversubscribed machine (wall time there is mostly
    # the scheduler's choice of who runs).
    key = 1 if use_gpu else 2
    base = rows[2][key]
    print("\n| path | step ms: wall | CPU, process | CPU, training thread | images/s (wall) | relative |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu, thread in rows:
        rel = base / (wall, cpu)[key - 1]
        ms = " | ".join(f"{v * 1e3:.1f}" for v in (wall, cpu, thread))
        print(f"| {name} | {ms} | {batch / wall:.1f} | {rel:.3f} |")
    if ray_metrics is not None:
        overhead = rows[3][key] / base - 1.0
        what = "wall" if use_gpu else "CPU"
        print(f"\nRay adapter overhead: {overhead * 100:+.1f}% step {what} time (target <= 5%)")
        if not use_gpu:
            thread_overhead = rows[3][3] / rows[2][3] - 1.0
            print(
                f"training thread alone: {thread_overhead * 100:+.1f}% (the rest is Ray's background threads)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
