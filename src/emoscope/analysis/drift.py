"""Drift of SAE features between a reference and a candidate (prompt change, precision), per example.

Raw drift (1 - Jaccard of the top-k active features) grows with depth for any change, because layers
differ in how example-specific their codes are; dividing by the drift between unrelated reference
examples turns it into the fraction of the way to an unrelated input, which phases can be compared on.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from .. import profiling


def jaccard_topk(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the Jaccard overlap of the top-k active (> 0) features of a and b [n, m]."""
    ta = np.argsort(-a, 1)[:, :k]
    tb = np.argsort(-b, 1)[:, :k]
    out = []
    for x, y, ra, rb in zip(ta, tb, a, b):
        sa, sb = set(x[ra[x] > 0]), set(y[rb[y] > 0])
        out.append(len(sa & sb) / max(len(sa | sb), 1))
    return np.array(out)


def rowcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the Pearson correlation of a and b (0 where either is constant)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)


def derangement(n: int, seed: int) -> np.ndarray:
    """order[i] != i for every i: one seeded cycle through all n rows, pairing each with another."""
    perm = np.random.default_rng(seed).permutation(n)
    order = np.empty_like(perm)
    order[perm] = np.roll(perm, -1)
    return order


def auroc_or_none(score: np.ndarray, flipped: np.ndarray) -> float | None:
    """AUROC with which `score` flags the flipped rows; None when all or none flipped."""
    return float(roc_auc_score(flipped, score)) if 0 < flipped.sum() < len(flipped) else None


@profiling.timed("statistics")
def phase_drift(per_ex: dict, unrelated: dict, phase: dict, n_phases: int, boots: np.ndarray) -> tuple[dict,
                                                                                                       dict | None]:
    """Normalised drift per phase: the phase's summed drift over its summed unrelated-input drift (a
    ratio of sums, so a layer where unrelated inputs barely differ cannot dominate), None where that
    is undefined; and the final phase's excess over the most-drifting earlier phase, with a bootstrap
    interval over examples (the unrelated-input baseline held fixed)."""
    per_phase = {}
    for p in range(n_phases):
        ls = [layer for layer in per_ex if phase[layer] == p]
        den = sum(unrelated[layer] for layer in ls)
        num = np.sum([per_ex[layer] for layer in ls], 0) if ls else None
        if num is None or (den == 0 and num.any()):
            per_phase[p] = None
        else:
            per_phase[p] = num / den if den > 0 else np.zeros_like(num)
    by_phase = {p: (float(v.mean()) if v is not None else None) for p, v in per_phase.items()}
    if n_phases < 2 or any(v is None for v in per_phase.values()):
        return by_phase, None
    m = np.stack([per_phase[p] for p in range(n_phases)])  # phases x examples
    def diff(mm):
        return mm[-1] - mm[:-1].max(0)
    boot = diff(m[:, boots].mean(2))
    return by_phase, {"value": float(diff(m.mean(1))), "lo": float(np.percentile(boot, 2.5)),
                      "hi": float(np.percentile(boot, 97.5))}


@profiling.timed("statistics")
def retained(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], rng, n_boot: int) -> dict | None:
    """Share of the reference's ablation effect still there in the candidate: mean candidate effect over
    mean reference effect on the same examples (all emotions pooled), with a paired bootstrap
    interval; and each emotion's two mean effects."""
    if not ref:
        return None
    r = np.concatenate([ref[k] for k in ref])
    c = np.concatenate([cur.get(k, np.zeros_like(ref[k])) for k in ref])
    if r.mean() <= 0:
        return None
    boots = rng.integers(0, len(r), (n_boot, len(r)))
    ratio = c[boots].mean(1) / np.maximum(r[boots].mean(1), 1e-9)
    return {"value": float(c.mean() / r.mean()), "lo": float(np.percentile(ratio, 2.5)),
            "hi": float(np.percentile(ratio, 97.5)), "n": int(len(r)),
            "per_emotion": {k: {"reference": float(ref[k].mean()), "candidate": float(cur.get(k, np.zeros(1)).mean())}
                            for k in ref}}
