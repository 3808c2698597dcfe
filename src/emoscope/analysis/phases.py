"""Phases: segment the layers into contiguous phases by change-point detection on per-layer
statistics, choose the number of phases by BIC, and put bootstrap intervals on the boundaries.

The statistics segmented are those that can be recomputed on a bootstrap resample of examples:
surface score, semantic score, fraction of emotion-selective features, logit-lens probability of the
gold label, and CKA with the previous layer; each is standardised across layers. Segments are
piecewise-constant fits (ruptures' exact dynamic programming, L2 cost).

Choosing the number of phases: each added phase must cut the residual sum of squares by at least
`min_gain` (20%) of the one-phase total. On pure noise the best extra split of 18 layers x 5
statistics explains about 17% by chance, so 20% keeps noise at one phase; BIC is reported beside it
but overfits when the statistics are nearly noise-free within phases.
"""

from __future__ import annotations

import numpy as np

SEGMENT_STATS = ["surface", "semantic", "selective_frac", "lens_gold_prob", "cka_prev"]
NAMES = {"surface": "surface/syntax", "semantic": "semantics", "selective_frac": "emotion"}


def standardize(S: np.ndarray) -> np.ndarray:
    S = np.array(S, dtype=float)
    for j in range(S.shape[1]):
        col = S[:, j]
        col[np.isnan(col)] = np.nanmean(col) if np.isfinite(col).any() else 0.0
        sd = col.std()
        S[:, j] = (col - col.mean()) / sd if sd > 0 else 0.0
    return S


def segment(S: np.ndarray, k: int) -> tuple[list[int], float]:
    """Best split of the rows of S into k contiguous segments: (first row of each later segment, RSS)."""
    import ruptures as rpt

    L = len(S)
    if k == 1:
        return [], float(((S - S.mean(0)) ** 2).sum())
    algo = rpt.Dynp(model="l2", min_size=1, jump=1).fit(S)
    ends = algo.predict(n_bkps=k - 1)
    return ends[:-1], float(algo.cost.sum_of_costs(ends)) if L else 0.0


def bic(rss: float, L: int, d: int, k: int) -> float:
    n = L * d
    return n * np.log(max(rss, 1e-12) / n) + (k * d + k - 1) * np.log(n)


def fit_phases(S: np.ndarray, max_phases: int = 5, min_gain: float = 0.2) -> dict:
    """Fits for 1..max_phases phases (limited by the number of layers) and the chosen number."""
    Z = standardize(S)
    L, d = Z.shape
    fits = {}
    for k in range(1, min(max_phases, L) + 1):
        b, rss = segment(Z, k)
        fits[k] = {"boundaries": b, "rss": rss, "bic": bic(rss, L, d, k)}
    total = fits[1]["rss"] or 1.0
    best = 1
    while best + 1 in fits and fits[best]["rss"] - fits[best + 1]["rss"] >= min_gain * total:
        best += 1
    return {"fits": fits, "n_phases": best, "boundaries": fits[best]["boundaries"],
            "criterion": f"gain >= {min_gain} of 1-phase RSS"}


def phase_of(n_layers: int, boundaries: list[int]) -> np.ndarray:
    """Phase index (0-based) of every layer."""
    return np.searchsorted(np.asarray(boundaries), np.arange(n_layers), side="right")


def name_phases(S: np.ndarray, columns: list[str], boundaries: list[int]) -> list[str]:
    """Name each phase by which of surface / semantic / emotion statistics is highest there (standardised)."""
    Z = standardize(S)
    ph = phase_of(len(Z), boundaries)
    names = []
    for p in range(len(boundaries) + 1):
        means = {NAMES[c]: Z[ph == p, columns.index(c)].mean() for c in NAMES if c in columns}
        names.append(max(means, key=means.get))
    return names


def boundary_intervals(boot_boundaries: list[list[int]], n_layers: int) -> list[dict]:
    """Percentile 95% intervals of each boundary (as a layer index and as a depth fraction)."""
    arr = np.array([b for b in boot_boundaries if len(b) == len(boot_boundaries[0])], dtype=float)
    out = []
    for j in range(arr.shape[1] if arr.ndim == 2 else 0):
        lo, hi = np.percentile(arr[:, j], [2.5, 97.5])
        out.append({"lo": float(lo), "hi": float(hi), "lo_depth": float(lo / n_layers),
                    "hi_depth": float(hi / n_layers)})
    return out
