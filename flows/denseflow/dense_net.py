"""DenseFlow's conditioning networks: dense blocks, gated convs and the multi-head dense block.

These are the networks inside couplings, the cross-unit noise and the variational dequantizer; none
of them is inverted, so they may be anything. They follow DenseFlow's code (matejgrcic/DenseFlow,
denseflow/nn/blocks/denseblock.py and denseflow/nn/nets/matching/densenet.py, identical in the EIW
authors' copy) layer by layer, with PyTorch's default initialisation as there; docs/model.md,
"DenseFlow base", lists what differs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.denseflow.attention import NystromAttention


class DenseLayer(nn.Module):
    """x (B, C, H, W) -> cat(x, relu(conv3x3(relu(conv1x1(x))))) (B, C + growth, H, W)."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.net(x)], dim=1)


class GatedConv2d(nn.Module):
    """a + b * sigmoid(c) with (a, b, c) the three chunks of one conv's output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, kernel_size=kernel_size, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        a, b, c = torch.chunk(self.conv(x), 3, dim=1)
        return a + b * torch.sigmoid(c)


def _zero_init(layer: nn.Module) -> None:
    conv = layer.conv if isinstance(layer, GatedConv2d) else layer
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class DenseBlock(nn.Sequential):
    """``depth`` dense layers, then a (gated) 1x1 conv: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        depth: int,
        growth: int,
        gated: bool = True,
        zero_init: bool = False,
    ) -> None:
        layers: list[nn.Module] = [DenseLayer(in_channels + i * growth, growth) for i in range(depth)]
        width = in_channels + depth * growth
        last = GatedConv2d(width, out_channels) if gated else nn.Conv2d(width, out_channels, kernel_size=1)
        if zero_init:
            _zero_init(last)
        super().__init__(*layers, last)


class ResidualDenseBlock(nn.Module):
    """x + DenseBlock(x), channels unchanged."""

    def __init__(self, channels: int, *, depth: int, growth: int, gated: bool = True) -> None:
        super().__init__()
        self.dense = DenseBlock(channels, channels, depth=depth, growth=growth, gated=gated)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dense(x)


class MultiHeadDenseBlock(nn.Module):
    """Nystrom attention beside a dense block, mixed by BatchNorm -> ReLU -> 1x1 conv (their
    ``MultiHeadDenseBlock``: one attention head of width C // 2 despite the name).

    (B, C, H, W) -> (B, C, H, W). The BatchNorm normalises with batch statistics in training and with
    running ones in eval, so a coupling is an exact bijection for a fixed mode (``model.eval()``
    before evaluating or sampling, as for any BatchNorm network).
    """

    def __init__(self, channels: int, *, depth: int, growth: int, num_landmarks: int) -> None:
        super().__init__()
        self.dense = DenseBlock(channels, channels, depth=depth, growth=growth, gated=True)
        self.attention = NystromAttention(channels, channels // 2, num_landmarks)
        self.mix = nn.Sequential(
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.Conv2d(2 * channels, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.cat([self.attention(x), self.dense(x)], dim=1))


def _between_1x1_convs(
    in_channels: int, mid_channels: int, out_channels: int, blocks: list[nn.Module]
) -> nn.Sequential:
    """1x1 conv in -> ``blocks`` (at ``mid_channels``) -> zero-initialised 1x1 conv out: the frame of
    both of their nets."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=1),
        *blocks,
        nn.Conv2d(mid_channels, out_channels, kernel_size=1),
    )
    _zero_init(net[-1])
    return net


class DenseNet(nn.Module):
    """1x1 conv -> ``num_blocks`` residual dense blocks -> zero-initialised 1x1 conv (their
    ``DenseNet``, used by the dequantizer): (B, C_in, H, W) -> (B, C_out, H, W), zero at init."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        mid_channels: int,
        depth: int,
        growth: int,
        num_blocks: int = 1,
    ) -> None:
        super().__init__()
        blocks = [ResidualDenseBlock(mid_channels, depth=depth, growth=growth) for _ in range(num_blocks)]
        self.net = _between_1x1_convs(in_channels, mid_channels, out_channels, blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DenseNetMultihead(nn.Module):
    """1x1 conv -> multi-head dense block -> zero-initialised 1x1 conv (their ``DenseNetMultihead``,
    the coupling network ``DNMH``): (B, C_in, H, W) -> (B, C_out, H, W), zero at init."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        mid_channels: int,
        depth: int,
        growth: int,
        num_landmarks: int,
    ) -> None:
        super().__init__()
        block = MultiHeadDenseBlock(mid_channels, depth=depth, growth=growth, num_landmarks=num_landmarks)
        self.net = _between_1x1_convs(in_channels, mid_channels, out_channels, [block])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
