"""Classification metrics with percentile-bootstrap 95% intervals (resampling examples).

Definitions match scikit-learn (macro-F1 over the task's labels, zero_division=0); the tests check
that. The bootstrap is vectorised: all replicates' confusion matrices come from one bincount.
"""

from __future__ import annotations

import numpy as np

from .. import profiling
from ..analysis.stats import interval


def _prf(cm: np.ndarray):
    """Precision, recall, F1 per class from confusion matrices [..., K, K] (rows = gold)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    pred, gold = cm.sum(-2), cm.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(pred > 0, tp / pred, 0.0)
        r = np.where(gold > 0, tp / gold, 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return p, r, f


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray | None = None):
    """Macro-F1 over k labels (as `classification_metrics`); with `idx` [n_boot, n], one value per resample."""
    if idx is None:
        return float(_prf(confusion(y_true, y_pred, k))[2].mean())
    flat = (np.arange(len(idx))[:, None] * k * k + y_true[idx] * k + y_pred[idx]).ravel()
    return _prf(np.bincount(flat, minlength=len(idx) * k * k).reshape(len(idx), k, k))[2].mean(-1)


@profiling.timed("statistics")
def classification_metrics(y_true, y_pred, labels: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1 (each with a bootstrap 95% interval) and the confusion matrix."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n, k = len(y_true), len(labels)
    cm = confusion(y_true, y_pred, k)
    p, r, f = _prf(cm)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * k * k + y_true[idx] * k + y_pred[idx]).ravel()
    cms = np.bincount(flat, minlength=n_boot * k * k).reshape(n_boot, k, k)
    bp, br, bf = _prf(cms)
    acc_b = np.trace(cms, axis1=1, axis2=2) / n
    return {
        "n": n,
        "n_boot": n_boot,
        "seed": seed,
        "accuracy": interval(np.trace(cm) / n, acc_b),
        "macro_f1": interval(f.mean(), bf.mean(-1)),
        "per_class": {
            lab: {"precision": interval(p[i], bp[:, i]), "recall": interval(r[i], br[:, i]),
                  "f1": interval(f[i], bf[:, i]), "support": int(cm[i].sum())}
            for i, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
        "labels": list(labels),
    }


DEGENERATE_SHARE = 0.5
"""A predictor whose most frequent answer takes more than this share of the texts is degenerate: its answers carry
little of the texts' emotion, and what its features, traces and audit flips explain is mostly that one bias."""


def answer_shares(y_pred, labels: list[str]) -> dict:
    """How the predictions spread over the labels: each label's share, the largest label, its share, and whether
    that share makes the predictor degenerate (above DEGENERATE_SHARE)."""
    counts = np.bincount(np.asarray(y_pred, dtype=int), minlength=len(labels))
    shares = counts / max(counts.sum(), 1)
    top = int(shares.argmax())
    return {"shares": {lab: round(float(s), 4) for lab, s in zip(labels, shares)}, "largest": labels[top],
            "largest_share": round(float(shares[top]), 4), "degenerate": bool(shares[top] > DEGENERATE_SHARE)}
