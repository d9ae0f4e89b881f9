"""The multi-scale flow and its public API (docs/model.md has the math).

Two bases share this assembly, the split strategies, the priors and the dequantization: Glow (below)
and DenseFlow (``base: denseflow``, flows/denseflow/levels.py: invertible dense blocks with
cross-unit noise, whose log-density enters ``log_det``, making ``log_prob`` a one-draw bound).

Architecture (Glow, Kingma & Dhariwal 2018, fig. 2): for each of L levels, squeeze, then K steps of
[ActNorm, invertible 1x1 conv, coupling], then (except at the top) a split that factors half of the
channels out as a latent. The top latent goes through a learned per-channel Gaussian prior.

Every latent returned by ``encode`` is standard normal under the model: the learned split and top
priors are affine standardisations inside the flow (see flows/split.py), so
log p(x) = sum_i log N(z_i; 0, I) + log_det.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from flows.actnorm import ActNorm
from flows.bijection import Bijection, Compose, standard_normal_log_prob
from flows.config import FlowConfig
from flows.coupling import AdditiveCoupling, AffineCoupling
from flows.denseflow.levels import build_dense_levels
from flows.dequantization import VariationalDequantizer
from flows.invconv import InvConv1x1
from flows.invertible import FlowLevel
from flows.split import LearnedTopPrior, Split
from flows.squeeze import Squeeze
from flows.strategies import build_split_strategy
from flows.strategies.base import kept_share

STRATEGY_SEED_OFFSET = 7919  # a prime: strategy seeds never collide with nearby init_seeds
DEQUANTIZER_SEED_OFFSET = 104729  # the 10,000th prime, past every strategy seed of a sane depth


def flow_step(num_channels: int, cfg: FlowConfig, generator: torch.Generator) -> Compose:
    """One Glow step of flow: ActNorm -> 1x1 conv -> coupling."""
    coupling_cls = AffineCoupling if cfg.coupling == "affine" else AdditiveCoupling
    return Compose(
        ActNorm(num_channels),
        InvConv1x1(num_channels, generator=generator),
        coupling_cls(num_channels, cfg.hidden_channels),
    )


class FlowModel(nn.Module):
    """x (B, C, H, W) in model space [-0.5, 0.5] <-> latents, one per split plus the top."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Every weight comes from init_seed, never from (or into) the global RNG; the split strategies
        # draw from their own seeds, so at one init_seed static, eiw and lcma share every coupling,
        # ActNorm and 1x1 weight (paired comparisons).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            self._build(cfg)

    def _build(self, cfg: FlowConfig) -> None:
        generator = torch.Generator().manual_seed(cfg.init_seed)
        c, h, w = cfg.image_shape
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        if cfg.base == "denseflow":
            levels, level_channels = build_dense_levels(cfg, generator)
        for level in range(cfg.num_levels):
            if cfg.base == "glow":
                c, h, w = 4 * c, h // 2, w // 2
                steps = [flow_step(c, cfg, generator) for _ in range(cfg.num_steps)]
                self.levels.append(FlowLevel(Squeeze(), *steps, memory=cfg.memory))
            else:
                if level == 0:  # DenseFlow's initial squeeze
                    h, w = h // 2, w // 2
                if level < cfg.num_levels - 1:  # the level ends in the next transition's squeeze
                    h, w = h // 2, w // 2
                c = level_channels[level]
                self.levels.append(levels[level])
            if level < cfg.num_levels - 1:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.init_seed + STRATEGY_SEED_OFFSET * (level + 1))
                    strategy = build_split_strategy(cfg.split, num_channels=c, height=h, width=w)
                split = Split(c, strategy=strategy, prior=cfg.split_prior)
                self.splits.append(split)
                self.latent_shapes.append((c - split.num_keep, h, w))
                c = split.num_keep
        self.top_prior: Bijection | None = LearnedTopPrior(c) if cfg.learn_top_prior else None
        self.latent_shapes.append((c, h, w))
        self.dequantizer: nn.Module | None = None
        if cfg.dequantization == "variational":
            # Its own seed: the flow's weights stay the same with either dequantization (paired runs).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed + DEQUANTIZER_SEED_OFFSET)
                self.dequantizer = VariationalDequantizer(
                    cfg.image_shape, n_bits=cfg.n_bits, cfg=cfg.dequantizer
                )

    @property
    def num_dims(self) -> int:
        return self.cfg.num_dims

    @property
    def memory(self) -> str:
        """What a training forward keeps for backward: "standard", "invertible" or "checkpoint"
        (``FlowConfig.memory``; flows/invertible.py). Settable at any time between steps: the mode
        changes no parameter, buffer or result, only memory and time (``cfg.memory`` follows)."""
        return self.cfg.memory

    @memory.setter
    def memory(self, mode: str) -> None:
        self.cfg = dataclasses.replace(self.cfg, memory=mode)  # validates
        for level in self.levels:
            level.memory = mode

    # ------------------------------------------------------------------ bijection
    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x: (B, C, H, W) float -> (zs, log_det (B,)); zs[i] has shape (B, *latent_shapes[i]).

        With gradients enabled, each level keeps for backward what ``self.memory`` says (every step's
        activations, only its output, or only its input); the values are the same in every mode.
        """
        zs: list[Tensor] = []
        log_det = x.new_zeros(x.shape[0])
        for level, steps in enumerate(self.levels):
            x, ld = steps(x)
            log_det = log_det + ld
            if level < len(self.splits):
                split = self.splits[level]
                y, ld = split(x)
                log_det = log_det + ld
                x, z = y[:, : split.num_keep], y[:, split.num_keep :]
                zs.append(z)
        if self.top_prior is not None:
            x, ld = self.top_prior(x)
            log_det = log_det + ld
        zs.append(x)
        return zs, log_det

    def decode(self, zs: list[Tensor]) -> Tensor:
        """The exact inverse of ``encode``: every latent (as returned by encode) -> x (B, C, H, W)."""
        if len(zs) != len(self.latent_shapes):
            raise ValueError(f"decode: expected {len(self.latent_shapes)} latents, got {len(zs)}")
        x = zs[-1] if self.top_prior is None else self.top_prior.inverse(zs[-1])
        for level in reversed(range(len(self.levels))):
            if level < len(self.splits):
                x = self.splits[level].inverse(torch.cat([x, zs[level]], dim=1))
            x = self.levels[level].inverse(x)
        return x

    # ------------------------------------------------------------------ training schedule
    def advance(self, step: int) -> None:
        """Tell every split strategy how many optimizer steps are done; call once per step.

        Call it before each training step's forward pass with ``step`` = the number of optimizer steps
        completed so far (0 before the first), on every rank, and again after resuming from a
        checkpoint (held permutations live in buffers and come back with the state_dict; this call
        re-attaches LCMA's measurement to its level). It is cheap and idempotent for a given step.
        Under DDP keep the default ``broadcast_buffers=True``: every rank then uses rank 0's buffers.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"advance: step must be an integer >= 0, got {step!r}")
        for level, split in zip(self.levels, self.splits, strict=False):
            split.strategy.bind(level)
            split.strategy.advance(step)

    def memory_diagnostics(self) -> dict[str, float]:
        """In invertible memory, after a backward: ``{"level<i>/rebuild_error": max |x - x_rebuilt|}``
        over each level's input, the drift of the inverses that backward evaluated the gradients at
        (docs/model.md, "Memory modes", says what is large); empty in the other modes. Reads device
        values: call it when logging, not every step."""
        out = {}
        for i, level in enumerate(self.levels):
            error = level.rebuild_error()
            if error is not None:
                out[f"level{i}/rebuild_error"] = float(error)
        return out

    def split_diagnostics(self) -> dict[str, float]:
        """Each split strategy's diagnostics as ``{"split<i>/<name>": value}`` (empty for none)."""
        return {
            f"split{i}/{name}": value
            for i, split in enumerate(self.splits)
            for name, value in split.strategy.diagnostics().items()
        }

    def kept_shares(self) -> list[Tensor]:
        """Per split, (C,) the share of positions at which each input channel continues: a picture of
        the current order (the trainer draws it over training)."""
        return [
            kept_share(split.strategy.channel_order(2 * split.num_keep).cpu(), split.num_keep)
            for split in self.splits
        ]

    # ------------------------------------------------------------------ likelihood
    def _check_uint8(self, x_uint8: Tensor, what: str) -> None:
        if not isinstance(x_uint8, Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor of uint8 pixels, got {type(x_uint8).__name__}")
        if x_uint8.dtype != torch.uint8:
            raise ValueError(
                f"{what}: expected dtype torch.uint8 pixels in 0..255, got {x_uint8.dtype}; "
                "pass raw pixels, the model dequantizes them itself"
            )
        if x_uint8.dim() == 4 and x_uint8.shape[0] == 0:
            raise ValueError(f"{what}: got an empty batch of shape {tuple(x_uint8.shape)}")
        if x_uint8.dim() != 4 or tuple(x_uint8.shape[1:]) != self.cfg.image_shape:
            raise ValueError(
                f"{what}: expected shape (B, {', '.join(map(str, self.cfg.image_shape))}), "
                f"got {tuple(x_uint8.shape)}"
            )

    def dequantize_with_log_q(
        self, x_uint8: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """uint8 (B, C, H, W) -> (x (B, C, H, W) in model space [-0.5, 0.5), log q(u | x) (B,)).

        Pixels are first reduced to ``n_bits`` (Glow's n_bits_x), k = x >> (8 - n_bits), then
        x = (k + u) / 2**n_bits - 0.5 with u ~ U[0, 1) (``dequantization: uniform``, log q = 0) or
        u ~ q(u | k) (``variational``: flows/dequantization.py). The float dtype is the parameters'.
        ``generator`` seeds uniform noise only.
        """
        self._check_uint8(x_uint8, "dequantize")
        dtype = next(self.parameters()).dtype
        k = torch.div(x_uint8, 2 ** (8 - self.cfg.n_bits), rounding_mode="floor").to(dtype)
        if self.dequantizer is None:
            u = torch.rand(k.shape, generator=generator, dtype=dtype, device="cpu" if generator else k.device)
            u, log_q = u.to(k.device), k.new_zeros(k.shape[0])
        else:
            u, log_q = self.dequantizer(k)
        return (k + u) / 2**self.cfg.n_bits - 0.5, log_q

    def dequantize(self, x_uint8: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, C, H, W) -> x in model space [-0.5, 0.5) (``dequantize_with_log_q`` without log q)."""
        return self.dequantize_with_log_q(x_uint8, generator=generator)[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """Continuous log-density of x in model space, (B, C, H, W) -> (B,). With base "denseflow" it
        is one draw of log p(x, eta) - log q(eta | x), a stochastic lower bound (its noise)."""
        zs, log_det = self.encode(x)
        return sum(standard_normal_log_prob(z) for z in zs) + log_det

    def log_weights(self, x_uint8: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One importance weight per image, log p(x_discrete) >= E[log w], uint8 (B, C, H, W) -> (B,) nats.

        log w = log p(x + u, eta) - log q(eta | x + u) - log q(u | x) - D log(2**n_bits): the
        dequantization bound (Theis et al. 2016; Flow++ for q(u | x)), with DenseFlow's augmentation
        noise eta. Every term but log p is 0 for a Glow base with uniform dequantization.
        """
        x, log_q_u = self.dequantize_with_log_q(x_uint8, generator=generator)
        return self.log_prob(x) - log_q_u - self.num_dims * self.cfg.n_bits * math.log(2.0)

    def bits_per_dim(self, x_uint8: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The negative ELBO of each image in bits per dimension, uint8 (B, C, H, W) -> (B,):
        -log w / (D log 2) for one draw of the noise (``log_weights``). For a Glow base with uniform
        dequantization that is the usual dequantized NLL, -log p(x + u) + D log(2**n_bits).
        Differentiable: the training loss is its mean.
        """
        self._check_uint8(x_uint8, "bits_per_dim")
        return -self.log_weights(x_uint8, generator=generator) / (self.num_dims * math.log(2.0))

    @torch.no_grad()
    def iwbo_bits_per_dim(
        self, x_uint8: Tensor, num_samples: int, *, chunk_size: int | None = None
    ) -> Tensor:
        """The importance-weighted bound (IWBO, Burda et al. 2016) in bits per dimension, (B,):
        -(logsumexp_k log w_k - log K) / (D log 2) over K = ``num_samples`` draws of the noise
        (dequantization and augmentation). It is >= the true NLL, <= the ELBO on average, and tightens
        as K grows. ``chunk_size`` images x draws go through the model at once (default: B, one draw
        per forward). Call in eval mode (``model.eval()``): BatchNorm and split statistics would
        otherwise depend on the repeated batch.
        """
        self._check_uint8(x_uint8, "iwbo_bits_per_dim")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"iwbo_bits_per_dim: num_samples must be an integer >= 1, got {num_samples!r}")
        batch = x_uint8.shape[0]
        draws_per_pass = max(1, (chunk_size or batch) // batch)
        log_w = []
        for start in range(0, num_samples, draws_per_pass):
            draws = min(draws_per_pass, num_samples - start)
            log_w.append(self.log_weights(x_uint8.repeat(draws, 1, 1, 1)).view(draws, batch))
        log_w_all = torch.cat(log_w, dim=0).to(torch.float64)  # (K, B); logsumexp of K terms in float64
        bound = torch.logsumexp(log_w_all, dim=0) - math.log(num_samples)
        return (-bound / (self.num_dims * math.log(2.0))).to(log_w[0].dtype)

    def regularization(self) -> Tensor:
        """Sum of the split strategies' regularisers from the last forward pass (0 for static splits)."""
        p = next(self.parameters())
        total = p.new_zeros(())
        for split in self.splits:
            reg = split.strategy.regularization()
            if reg is not None:
                total = total + reg
        return total

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self, num: int, temperature: float = 1.0, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``num`` images as uint8 (num, C, H, W); latents are N(0, temperature**2 I) (Glow)."""
        if num < 1:
            raise ValueError(f"sample: num must be >= 1, got {num}")
        if not 0.0 <= temperature < math.inf:
            raise ValueError(f"sample: temperature must be a finite number >= 0, got {temperature}")
        p = next(self.parameters())
        zs = [
            temperature * torch.randn((num, *shape), generator=generator, dtype=p.dtype).to(p.device)
            for shape in self.latent_shapes
        ]
        return self.quantize(self.decode(zs))

    def quantize(self, x: Tensor) -> Tensor:
        """Model space float (B, C, H, W) -> uint8 pixels on the n_bits grid, clamped to range."""
        levels = 2**self.cfg.n_bits
        k = torch.floor((x + 0.5) * levels).clamp_(0, levels - 1)
        return (k * 2 ** (8 - self.cfg.n_bits)).to(torch.uint8)


def build_flow(cfg: FlowConfig) -> FlowModel:
    """The public constructor: a ``FlowModel`` for ``cfg`` (ActNorm not yet initialised)."""
    if not isinstance(cfg, FlowConfig):
        raise ValueError(f"build_flow: expected a FlowConfig, got {type(cfg).__name__}")
    return FlowModel(cfg)
