"""The split-strategy abstraction: which channels continue and which are factored out at a split.

A strategy is a permutation of the (C, H, W) input of a split, applied before the fixed cut
"first half continues, second half is factored out". A permutation has log_det 0. It must be a
function of parameters and buffers only (never of the data being encoded), so ``decode`` and
``sample`` can rebuild it; data may influence it only through training (a regulariser, running
statistics frozen into buffers).
"""

from __future__ import annotations

from torch import Tensor, nn


class SplitStrategy(nn.Module):
    """Base class. x: (B, C, H, W) -> permuted x of the same shape."""

    def permute(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpermute(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def regularization(self) -> Tensor | None:
        """Regulariser of the last forward pass (scalar), or None when the strategy has none."""
        return None
