"""The split order over training, as numbers and as one picture.

At every log step rank 0 records ``FlowModel.kept_shares()``: per split a (C,) vector, the share of
positions at which each input channel continues (0 or 1 for a per-channel order, fractions for
LCMA's per-position order). ``render`` draws one heat map per split, channel (rows) against log step
(columns), so a settled order shows as horizontal bands and churn as speckle.

``OrderHistory`` survives restarts through MLflow: ``to_npz`` / ``from_npz`` (the loop keeps the
file as the run artifact ``order/kept_share.npz``, rewritten at each checkpoint); a resumed run
reads it back and drops the steps after its checkpoint, which it recomputes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

ARTIFACT_DIR = "order"
DATA_NAME = "kept_share.npz"
PICTURE_NAME = "kept_share.png"


class OrderHistory:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.shares: list[list[np.ndarray]] = []  # per recorded step, per split: (C,) float32

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def num_splits(self) -> int:
        return len(self.shares[0]) if self.shares else 0

    def record(self, step: int, shares: Sequence[Tensor]) -> None:
        """Add ``kept_shares()`` at ``step`` (a step recorded before is replaced); no splits: no-op."""
        if not shares:
            return
        row = [s.detach().float().cpu().numpy().astype(np.float32) for s in shares]
        if self.shares and [a.shape for a in row] != [a.shape for a in self.shares[0]]:
            raise ValueError(
                f"kept shares of shapes {[a.shape for a in row]} at step {step}, "
                f"{[a.shape for a in self.shares[0]]} before: a different model"
            )
        self.truncate(step - 1)
        self.steps.append(int(step))
        self.shares.append(row)

    def truncate(self, last_step: int) -> None:
        """Forget the steps after ``last_step`` (a resumed run recomputes them)."""
        keep = sum(1 for s in self.steps if s <= last_step)
        del self.steps[keep:], self.shares[keep:]

    def matrices(self) -> list[np.ndarray]:
        """Per split, (C, T): column t is the kept share of each channel at ``steps[t]``."""
        return [np.stack([row[i] for row in self.shares], axis=1) for i in range(self.num_splits)]

    # ------------------------------------------------------------------------- persistence
    def to_npz(self) -> bytes:
        arrays = {f"split{i}": m for i, m in enumerate(self.matrices())}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, steps=np.asarray(self.steps, dtype=np.int64), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, path: str | Path) -> OrderHistory:
        """Read ``to_npz``'s file (plain arrays only: ``allow_pickle=False``)."""
        history = cls()
        with np.load(path, allow_pickle=False) as data:
            steps = data["steps"]
            names = sorted((k for k in data.files if k.startswith("split")), key=lambda k: int(k[5:]))
            matrices = [data[k] for k in names]
        for t, step in enumerate(steps.tolist()):
            history.steps.append(int(step))
            history.shares.append([m[:, t].astype(np.float32) for m in matrices])
        return history

    # ------------------------------------------------------------------------------ picture
    def render(self, path: str | Path, *, title: str = "") -> Path:
        """One heat map per split (channel x log step, share kept in [0, 1]) as a PNG at ``path``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.steps:
            raise ValueError("no kept shares recorded")
        matrices = self.matrices()
        heights = [max(1.2, 0.12 * m.shape[0]) + 0.6 for m in matrices]
        fig = Figure(figsize=(9, sum(heights) + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(matrices), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        edges = _column_edges(np.asarray(self.steps, dtype=np.float64))
        for i, (ax, m) in enumerate(zip(axes, matrices, strict=True)):
            # Columns centred on their log steps, even when the spacing is uneven (the last step).
            image = ax.pcolormesh(
                edges, np.arange(m.shape[0] + 1) - 0.5, m, cmap="viridis", vmin=0.0, vmax=1.0
            )
            ax.set_ylabel(f"split {i}\nchannel ({m.shape[0]})")
            if m.shape[0] <= 16:
                ax.set_yticks(range(m.shape[0]))
        axes[-1].set_xlabel(f"step ({len(self.steps)} log steps)")
        fig.colorbar(image, ax=list(axes), label="share of positions kept", shrink=0.9)
        if title:
            fig.suptitle(title)
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def _column_edges(steps: np.ndarray) -> np.ndarray:
    """(T + 1,) x edges: midpoints between neighbouring steps, half a gap beyond either end."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
