"""DenseFlow rows of flow_step.py: our ``base: denseflow`` against the EIW authors' DenseFlow.

The authors' code is studying910/EIW-Flow, folder ``DIW-Flow/`` (DenseFlow, Grcic et al. 2021, plus
the Shuffle). ``--authors-code PATH``, or else the environment variable ``EIW_AUTHORS_CODE=PATH``,
names it: that folder itself, a checkout of studying910/EIW-Flow (its ``DIW-Flow/`` is used) or a bare
git clone of it (``DIW-Flow/`` of HEAD is extracted into a temporary folder). ``--denseflow`` without
either, or with a path that is none of these, is an ``error:`` line naming both, exit 2.

Same configuration for both: variational dequantization (their ``DequantizationFlow``, our
``dequantizer`` defaults = theirs), an initial squeeze, per level an invertible dense block of
``units`` units of ``layers`` x [ActNorm, 1x1 conv, affine coupling (DNMH net: dense block depth 7,
growth 64, Nystrom attention), switch] with ``growth_rate`` noise channels, the EIW Shuffle transition
with a standard-normal split prior, a learned per-channel Gaussian base.

Their training step (experiments/image/experiment/baseline_flow.py ``train_fn``):
``loss, scale_loss = elbo_bpd(model, x); (loss + sigma*scale_loss).backward(); optimizer.step()``,
where ``elbo_bpd`` (denseflow/utils/loss.py ``loglik_bpd``) calls ``model.log_prob(x)`` twice (one
forward for the loss, one for the scale loss, both graphs are kept for backward). x: long tensors
with values 0..255 (their ``Quantize`` transform). Ours (pipeline/step.py): ``model.advance(step)``,
``training_loss(bits_per_dim(x_uint8), regularization(), sigma)``, one forward.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch

from flows import FlowConfig, build_flow, initialize_actnorm, training_loss
from flows.config import DenseFlowConfig, SplitConfig

AUTHORS_CODE_ENV = "EIW_AUTHORS_CODE"
MARKER = "experiments/image/model/dense_flow.py"  # a file only the DIW-Flow folder has
SIGMA = 1e-3  # their default weight of the scale loss (denseflow/utils/loss.py) = our loss.sigma role
NAMES = ("authors", "ours-denseflow")
CHECKPOINT_NAMES = ("authors-ckpt", "ours-denseflow-ckpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DenseFlow against the EIW authors' code (--denseflow)")
    g.add_argument("--denseflow", action="store_true", help="time the DenseFlow rows instead of Glow's")
    g.add_argument(
        "--authors-code",
        default=None,
        help=f"studying910/EIW-Flow: its DIW-Flow/, a checkout or a bare clone (else ${AUTHORS_CODE_ENV})",
    )
    g.add_argument("--units", type=int, nargs="+", default=[2, 2, 1], help="units per level (block_config)")
    g.add_argument("--layers", type=int, nargs="+", default=[1, 1, 2], help="layers per unit (layers_config)")
    g.add_argument("--mid", type=int, nargs="+", default=[16, 16, 16], help="coupling widths (mid_chnls)")
    g.add_argument("--growth", type=int, default=4, help="cross-unit noise channels (growth_rate)")
    g.add_argument(
        "--checkpoint",
        action="store_true",
        help="also time ours with memory: checkpoint against their checkpointing=True",
    )


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def locate_authors_code(path: str | None) -> Path:
    """The DIW-Flow folder named by ``path`` (``--authors-code``), else by ``$EIW_AUTHORS_CODE``:
    the folder itself, a checkout holding it as ``DIW-Flow/``, or a bare git clone (extracted to a
    temporary folder removed at exit). Exits 2 with an ``error:`` line when there is none."""
    origin = "--authors-code" if path is not None else AUTHORS_CODE_ENV
    source = path if path is not None else os.environ.get(AUTHORS_CODE_ENV) or None
    if source is None:
        _fail(
            f"--denseflow needs the EIW authors' code (studying910/EIW-Flow): pass --authors-code PATH "
            f"or set {AUTHORS_CODE_ENV}=PATH (its DIW-Flow/ folder, a checkout or a bare clone)"
        )
    root = Path(source).expanduser()
    for folder in (root, root / "DIW-Flow"):
        if (folder / MARKER).is_file():
            return folder
    if (root / "HEAD").is_file() and (root / "objects").is_dir() and shutil.which("git") is not None:
        archive = subprocess.run(["git", "-C", str(root), "archive", "HEAD", "DIW-Flow"], capture_output=True)
        if archive.returncode == 0:
            tmp = Path(tempfile.mkdtemp(prefix="eiw_authors_"))
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
            if (tmp / "DIW-Flow" / MARKER).is_file():
                return tmp / "DIW-Flow"
    _fail(
        f"{origin} {source}: neither {MARKER} nor DIW-Flow/{MARKER} is there, nor is it a git clone "
        f"of studying910/EIW-Flow with DIW-Flow/ (set --authors-code PATH or {AUTHORS_CODE_ENV}=PATH)"
    )


def names(args: argparse.Namespace) -> list[str]:
    return list(NAMES) + (list(CHECKPOINT_NAMES) if args.checkpoint else [])


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
