"""Overlap metrics between binary masks: numpy in, floats out.

Empty-mask policy: a ratio whose denominator is zero is 1 when both masks agree on
emptiness (both empty: a perfect answer) and 0 otherwise, never NaN that would drop out of
a mean and flatter a model that misses.
"""
from __future__ import annotations

import numpy as np


def _counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int, int]:
    assert pred.shape == target.shape, f"pred {pred.shape} vs target {target.shape}"
    p, t = pred.astype(bool), target.astype(bool)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = p.size - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: int, den: int, agree: bool) -> float:
    return num / den if den else (1.0 if agree else 0.0)


def overlap_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU = |A n B| / |A u B|, precision, recall and specificity of two (D, H, W) masks."""
    tp, fp, fn, tn = _counts(pred, target)
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, fn == 0),
        "recall": _ratio(tp, tp + fn, fp == 0),
        "specificity": _ratio(tn, tn + fp, fn == 0),
    }


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    return overlap_metrics(pred, target)["dice"]


def compute_metrics(pred: np.ndarray, target: np.ndarray, *, spacing) -> dict[str, float]:
    """All metrics of one case. `spacing`: (sz, sy, sx) mm, array order (used by the
    distance metrics)."""
    return overlap_metrics(pred, target)


def summarise(rows: list[dict[str, float]], keys) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (population) of each metric over cases."""
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in keys}
