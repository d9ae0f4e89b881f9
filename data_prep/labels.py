"""Class labels read from a release, checked against the range that release defines.

A label outside the release's range, or one that is not a whole number, means the input is not the
release we think it is (or is damaged); stored as is, it would either crash training far from its
cause or, worse, silently train on wrong classes (`int(1.7) == 1`, and 5000 with 1000 classes
indexes past the classifier). So a converter stops before writing anything, naming the file, the
offending value and its row.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def integer_labels(raw: Any, *, low: int, high: int, where: str) -> np.ndarray:
    """`raw` as a 1-D int64 array, every value a whole number in [low, high].

    `where` names the file (and key) in the error. Floats are accepted only when integral (some
    re-exports store labels as float); booleans, strings and objects are not labels.
    """
    try:
        values = np.asarray(raw).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: labels are not a flat list of numbers ({exc})") from exc
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{where}: label {values[i].item()!r} at row {i} is not a whole number "
                f"({bad.size} of {values.size} rows); expected integers {low}..{high}"
            )
    elif values.dtype.kind not in "iu" and values.size:
        raise ValueError(f"{where}: labels must be integers {low}..{high}, got {values.dtype} values")
    labels = values.astype(np.int64)
    bad = np.flatnonzero((labels < low) | (labels > high))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: label {labels[i]} at row {i} is outside {low}..{high} "
            f"({bad.size} of {labels.size} rows)"
        )
    return labels
