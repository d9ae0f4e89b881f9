"""DenseFlow rows of flow_step.py: our ``base: denseflow`` against the EIW authors' DenseFlow.

The authors' code is studying910/EIW-Flow, folder ``DIW-Flow/`` (DenseFlow, Grcic et al. 2021, plus
the Shuffle). ``--authors-code PATH`` points at that folder; by default it is extracted from the local
git mirror (``MIRROR``) into a temporary directory. Without either, the authors' rows are skipped
with a message and only ours is timed.

Same configuration for both: variational dequantization (their ``DequantizationFlow``, our
``dequantizer`` defaults = theirs), an initial squeeze, per level an invertible dense block of
``units`` units of ``layers`` x [ActNorm, 1x1 conv, affine coupling (DNMH net: dense block depth 7,
growth 64, Nystrom attention), switch] with ``growth_rate`` noise channels, the EIW Shuffle transition
with a standard-normal split prior, a learned per-channel Gaussian base.

Their training step (experiments/image/experiment/baseline_flow.py ``train_fn``):
``loss, scale_loss = elbo_bpd(model, x); (loss + sigma * scale_loss).backward(); optimizer.step()``,
where ``elbo_bpd`` (denseflow/utils/loss.py ``loglik_bpd``) calls ``model.log_prob(x)`` twice (one
forward for the loss, one for the scale loss, both graphs are kept for backward). x: long tensors
with values 0..255 (their ``Quantize`` transform). Ours (pipeline/step.py): ``model.advance(step)``,
``training_loss(bits_per_dim(x_uint8), regularization(), sigma)``, one forward.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flows import FlowConfig, build_flow, initialize_actnorm, training_loss
from flows.config import DenseFlowConfig, SplitConfig

MIRROR = Path("/work/.mirror/studying910+EIW-Flow/repo")
SIGMA = 1e-3  # their default weight of the scale loss (denseflow/utils/loss.py) = our loss.sigma role
NAMES = ("authors", "ours-denseflow")
CHECKPOINT_NAMES = ("authors-ckpt", "ours-denseflow-ckpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DenseFlow against the EIW authors' code (--denseflow)")
    g.add_argument("--denseflow", action="store_true", help="time the DenseFlow rows instead of Glow's")
    g.add_argument("--authors-code", default=None, help="the DIW-Flow folder of studying910/EIW-Flow")
    g.add_argument("--units", type=int, nargs="+", default=[2, 2, 1], help="units per level (block_config)")
    g.add_argument("--layers", type=int, nargs="+", default=[1, 1, 2], help="layers per unit (layers_config)")
    g.add_argument("--mid", type=int, nargs="+", default=[16, 16, 16], help="coupling widths (mid_chnls)")
    g.add_argument("--growth", type=int, default=4, help="cross-unit noise channels (growth_rate)")
    g.add_argument(
        "--checkpoint",
        action="store_true",
        help="also time ours with memory: checkpoint against their checkpointing=True",
    )


def locate_authors_code(path: str | None) -> Path | None:
    """The DIW-Flow folder: ``path`` if given, else extracted from the mirror; None (with a message
    on stderr) when neither is there."""
    if path is not None:
        folder = Path(path)
        if (folder / "experiments/image/model/dense_flow.py").is_file():
            return folder
        print(
            f"--authors-code {path}: no experiments/image/model/dense_flow.py there; "
            "skipping the authors' rows",
            file=sys.stderr,
        )
        return None
    if not MIRROR.exists() or shutil.which("git") is None:
        print(
            f"the EIW authors' code was not found (no --authors-code and no mirror at {MIRROR}); "
            "skipping the authors' rows. Pass --authors-code PATH/TO/EIW-Flow/DIW-Flow",
            file=sys.stderr,
        )
        return None
    tmp = Path(tempfile.mkdtemp(prefix="eiw_authors_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    archive = subprocess.run(
        ["git", "-C", str(MIRROR), "archive", "HEAD", "DIW-Flow"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "DIW-Flow"


def names(args: argparse.Namespace) -> list[str]:
    out = list(NAMES) + (list(CHECKPOINT_NAMES) if args.checkpoint else [])
    return out if args.authors_code else [n for n in out if n.startswith("ours")]


def build_authors(args: argparse.Namespace, checkpointing: bool):
    if args.authors_code not in sys.path:
        sys.path.insert(0, args.authors_code)  # their packages: denseflow/ and experiments/
    from denseflow.utils.loss import elbo_bpd  # type: ignore[import-not-found]
    from experiments.image.model.dense_flow import DenseFlow  # type: ignore[import-not-found]

    model = DenseFlow(
        data_shape=(3, args.size, args.size),
        block_config=list(args.units),
        layers_config=list(args.layers),
        layer_mid_chnls=list(args.mid),
        growth_rate=args.growth,
        num_bits=8,
        checkpointing=checkpointing,
    ).to(args.device)
    model.train()

    def loss_fn(x_uint8: torch.Tensor) -> torch.Tensor:
        loss, scale_loss = elbo_bpd(model, x_uint8.long())  # their loader yields long tensors
        return loss + SIGMA * scale_loss

    with torch.no_grad():  # their ActNorm initialises on its first training forward
        loss_fn(images(args).to(args.device))
    return model, loss_fn


def build_ours(args: argparse.Namespace, memory: str):
    cfg = FlowConfig(
        image_shape=(3, args.size, args.size),
        num_levels=len(args.units),
        base="denseflow",
        dequantization="variational",
        split_prior="standard",
        memory=memory,
        split=SplitConfig(strategy="eiw"),
        denseflow=DenseFlowConfig(
            units=tuple(args.units),
            layers=tuple(args.layers),
            mid_channels=tuple(args.mid),
            growth_rate=args.growth,
            net_depth=7,
            net_growth=64,
            attention_landmarks=4,
        ),
    )
    model = build_flow(cfg).to(args.device)
    model.train()
    initialize_actnorm(model, images(args).to(args.device))
    step = [0]

    def loss_fn(x_uint8: torch.Tensor) -> torch.Tensor:
        model.advance(step[0])  # as pipeline/loop.py: once per optimizer step, before the forward
        step[0] += 1
        return training_loss(model.bits_per_dim(x_uint8), model.regularization(), SIGMA)

    return model, loss_fn


def images(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8)


def make(args: argparse.Namespace, name: str):
    if name.startswith("authors"):
        return build_authors(args, checkpointing=name.endswith("-ckpt"))
    return build_ours(args, memory="checkpoint" if name.endswith("-ckpt") else "standard")


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--denseflow", "--size", str(args.size), "--batch", str(args.batch), "--growth", str(args.growth)]
    for key in ("units", "layers", "mid"):
        argv += [f"--{key}", *map(str, getattr(args, key))]
    if args.authors_code:
        argv += ["--authors-code", args.authors_code]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def describe(args: argparse.Namespace, models: dict) -> str:
    counts = ", ".join(f"{n} {sum(p.numel() for p in m.parameters()):,}" for n, m in models.items())
    return (
        f"DenseFlow: units={args.units} layers={args.layers} mid={args.mid} growth={args.growth} "
        f"net depth 7 / growth 64, variational dequantization, EIW Shuffle, sigma={SIGMA}; "
        f"parameters: {counts}"
    )
