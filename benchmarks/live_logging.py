"""What live MLflow logging costs the training step, in one run.

    python -m benchmarks.live_logging [--config configs/sample.yaml] [--log-every 20] [--segment 40]
        [--rounds 3] [--system-interval 1] [--tracking-uri URI] [--threads 1]

Runs ``pipeline.step.train_step`` on the sample config's model (fixed synthetic batches) in segments
of ``--segment`` steps, one segment per mode per round, the modes' order rotating between rounds:

- ``off``: no tracking at all;
- ``sync``: every log step's metrics (the loop's real set: the metric window, the split diagnostics,
  the kept shares for the order picture) with a synchronous ``log_batch``;
- ``async``: the same through MLflow's asynchronous logging (the pipeline's default);
- ``async + system``: and MLflow's system metrics monitor sampling every ``--system-interval`` s.

Each segment waits for its queued values before its clock stops, so nothing it sent is left out.
Per step (medians over segments): wall time, process CPU time, the training thread's CPU time and
the rest (MLflow's logging and monitor threads, torch's helpers); per log step, the wall and CPU
time of the loop's logging block in the training thread (metric window, diagnostics, kept shares,
handing the values to MLflow). On a shared CPU box the CPU columns are the ones to trust. MLflow is
a real ``mlflow server`` on a sqlite store started here (or ``--tracking-uri``), sharing the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import pin_openmp_threads, set_cpu_threads

if __name__ == "__main__":
    pin_openmp_threads(__spec__.name)

import torch

from flows import build_flow, initialize_actnorm
from pipeline.config import MlflowConfig, TrainConfig, load_config
from pipeline.metric_window import MetricWindow
from pipeline.runtime import Runtime
from pipeline.step import TrainingObjective, lr_factor, make_optimizer, train_step
from pipeline.tracking import Tracker

MODES = ("off", "sync", "async", "async + system")


class PlainRuntime(Runtime):
    def __init__(self, device: torch.device) -> None:
        self.device = device


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def tracker_for(mode: str, uri: str, args: argparse.Namespace, root: Path) -> Tracker | None:
    if mode == "off":
        return None
    cfg = MlflowConfig(
        tracking_uri=uri,
        experiment="bench-live-logging",
        async_metrics=mode != "sync",
        system_metrics=mode == "async + system",
        system_metrics_interval_s=args.system_interval,
    )
    tracker = Tracker(cfg, active=True, run_root=root)
    tracker.start(run_id=None, run_name=f"bench-{mode}", params={"mode": mode}, tags={})
    tracker.log_metrics(0, {"warm": 0.0})  # the connection and MLflow's logging threads, untimed
    tracker.wait()
    return tracker


def segment(tracker, state, cfg: TrainConfig, args, start_step: int) -> dict[str, float]:
    """Per step: wall and process CPU of the segment (everything, the final wait included), the
    training thread's CPU; per log step: wall and thread CPU of the loop's logging block."""
    flow, objective, optimizer, scheduler, batches, runtime = state
    window = MetricWindow(images_per_step=cfg.data.batch_size, first_window_steps=args.log_every)
    log_wall, log_cpu, log_steps = 0.0, 0.0, 0
    began, began_cpu, began_thread = time.perf_counter(), time.process_time(), time.thread_time()
    for i in range(start_step, start_step + args.segment):
        flow.advance(i)
        batch = batches[i % len(batches)]
        window.add(train_step(objective, batch, optimizer, scheduler, cfg=cfg, runtime=runtime))
        step = i + 1
        if tracker is not None and step % args.log_every == 0:
            t0, c0 = time.perf_counter(), time.thread_time()
            # What pipeline.loop.Trainer.log_window does on rank 0.
            metrics, _ = window.close(step, lr=scheduler.get_last_lr()[0], skipped_total=0)
            metrics |= {f"diag/{k}": v for k, v in flow.split_diagnostics().items()}
            tracker.record_order(step, flow.kept_shares())
            tracker.log_metrics(step, metrics)
            log_wall += time.perf_counter() - t0
            log_cpu += time.thread_time() - c0
            log_steps += 1
    if tracker is not None:
        tracker.wait()
    n = args.segment
    return {
        "wall": (time.perf_counter() - began) / n,
        "cpu": (time.process_time() - began_cpu) / n,
        "thread": (time.thread_time() - began_thread) / n,
        "log_wall": log_wall / max(log_steps, 1),
        "log_cpu": log_cpu / max(log_steps, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", help="experiment YAML (model and batch size); default: configs/sample.yaml"
    )
    parser.add_argument("--log-every", type=int, default=20, help="steps per log step (run.log_every)")
    parser.add_argument("--segment", type=int, default=40, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--system-interval", type=float, default=1.0, help="system metrics sampling (s)")
    parser.add_argument("--tracking-uri", default="", help="an MLflow server to use instead of starting one")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(args.config or repo / "configs" / "sample.yaml", args.overrides)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    set_cpu_threads(args.threads, device.type)
    torch.manual_seed(0)
    flow = build_flow(cfg.model).to(device)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, *cfg.model.image_shape)
    batches = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device) for _ in range(4)]
    initialize_actnorm(flow, batches[0])
    runtime = PlainRuntime(device)
    optimizer = make_optimizer(flow.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    state = (flow, TrainingObjective(flow), optimizer, scheduler, batches, runtime)
    m = cfg.model
    print(f"model {m.num_levels}x{m.num_steps} hidden {m.hidden_channels} split {m.split.strategy}, "
          f"batch {cfg.data.batch_size} x {m.image_shape}, device {device}, log every {args.log_every} "
          f"steps, {args.segment}-step segments x {args.rounds} rounds, system metrics every "
          f"{args.system_interval} s")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        root = Path(tmp)
        server = None
        uri = args.tracking_uri
        if not uri:
            server, uri = start_server(root)
        try:
            step = 0
            segment(None, state, cfg, argparse.Namespace(**{**vars(args), "segment": args.warmup}), 0)
            step += args.warmup
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for r in range(args.rounds):
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    tracker = tracker_for(mode, uri, args, root)
                    results[mode].append(segment(tracker, state, cfg, args, step))
                    step += args.segment
                    if tracker is not None:
                        tracker.end()
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)

    med = statistics.median
    base = med(r["cpu"] for r in results["off"])
    print("\n| mode | per step ms: wall | CPU, process | CPU, training thread | CPU, other threads "
          "| per log step ms: wall | CPU | process CPU vs off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        rows = results[mode]
        wall, cpu, thread = (med(r[k] for r in rows) for k in ("wall", "cpu", "thread"))
        other = med(r["cpu"] - r["thread"] for r in rows)
        per_step = " | ".join(f"{v * 1e3:.1f}" for v in (wall, cpu, thread, other))
        per_log = " | ".join(f"{med(r[k] for r in rows) * 1e3:.2f}" for k in ("log_wall", "log_cpu"))
        print(f"| {mode} | {per_step} | {per_log} | {cpu / base - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
