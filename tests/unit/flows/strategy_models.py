"""Tiny models and strategies shared by the split-strategy tests (test_strategies.py,
test_eiw_shuffle.py): 3x8x8 Glows per strategy, a few training steps, and EIW/LCMA strategies set to
known logits and orders."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows import FlowConfig, SplitConfig, build_flow, initialize_actnorm, training_loss
from flows.strategies import EIWShuffleSplit, LCMASplit
from flows.strategies.eiw_parts import CountGenerator, FreeLogits


def tiny_model(strategy: str, **split) -> nn.Module:
    if strategy == "lcma":
        split.setdefault("warmup_steps", 2)
    cfg = FlowConfig(
        image_shape=(3, 8, 8), num_levels=2, num_steps=2, hidden_channels=8,
        split=SplitConfig(strategy=strategy, **split),
    )  # fmt: skip
    return build_flow(cfg).double()


def images(n: int, seed: int = 0) -> Tensor:
    return torch.randint(
        0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def train(model: nn.Module, steps: int, *, first_step: int = 0, sigma: float = 1e-3) -> None:
    """The loop the trainer runs: advance, bits/dim + sigma * regularization, Adam step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(first_step, first_step + steps):
        model.advance(step)
        loss = training_loss(model.bits_per_dim(images(8, seed=step)), model.regularization(), sigma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def trained(strategy: str, steps: int = 4, **split) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_model(strategy, **split)
    initialize_actnorm(model, images(16))
    train(model, steps)
    return model


def set_channel_logits(strategy: EIWShuffleSplit, logits: list[float]) -> None:
    """Make the generator output exactly ``logits``: for the authors' bias-free count generator,
    W1 = 1/C (every hidden unit is 1 after the ReLU) and W2 = logits / hidden."""
    generator = strategy.generator
    with torch.no_grad():
        if isinstance(generator, FreeLogits):
            generator.logits.copy_(torch.tensor(logits, dtype=generator.logits.dtype))
        elif isinstance(generator, CountGenerator):
            first, last = generator.fc[0], generator.fc[2]
            first.weight.fill_(1.0 / generator.input_value)
            last.weight.copy_(
                torch.tensor(logits, dtype=last.weight.dtype).view(-1, 1).expand_as(last.weight)
                / last.weight.shape[1]
            )
        else:
            last = generator.net[-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(logits, dtype=last.bias.dtype))
    torch.testing.assert_close(
        generator().detach(), torch.tensor(logits, dtype=torch.float64), atol=1e-9, rtol=1e-12
    )


def frozen_lcma(c: int = 4, h: int = 2, w: int = 2, factor_out: str = "low", seed: int = 0) -> LCMASplit:
    strategy = LCMASplit(c, h, w, factor_out=factor_out).double()
    strategy.running_contribution.copy_(torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed)))
    strategy.num_updates.fill_(1)
    strategy.freeze()
    return strategy


def eiw_strategy(frozen: bool = False, **options) -> EIWShuffleSplit:
    strategy = EIWShuffleSplit(4, se_reduction=2, generator_hidden=3, **options).double()
    set_channel_logits(strategy, [0.1, 2.0, -1.0, 0.7])  # permutation [1, 3, 0, 2]: not the identity
    with torch.no_grad():  # as if the generator had started at these logits
        strategy.logit_ema.copy_(strategy.generator())
        strategy.initial_perm.copy_(torch.tensor([1, 3, 0, 2]))
        strategy.held_perm.copy_(strategy.initial_perm)
        strategy.last_kept.copy_(torch.tensor([1, 3]))
    if frozen:
        strategy.freeze()
        set_channel_logits(strategy, [3.0, 2.0, 1.0, 0.0])
    return strategy
