"""Small, vectorised statistics used across the analyses (each checked against scipy/sklearn in tests)."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.stats import norm, rankdata

from .. import profiling


def _tie_term(x: np.ndarray) -> np.ndarray:
    """Per column, the sum over groups of tied values of t^3 - t (vectorised run-length count)."""
    n, m = x.shape
    xs = np.sort(x, axis=0)
    new = np.vstack([np.ones((1, m), bool), xs[1:] != xs[:-1]])
    gid = np.cumsum(new, axis=0) - 1 + np.arange(m)[None, :] * n
    t = np.bincount(gid.ravel(), minlength=n * m).astype(float)
    return (t ** 3 - t).reshape(m, n).sum(1)


@profiling.timed("statistics")
def rank_tests(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest AUROC and two-sided Mann-Whitney p-values (normal approximation with tie and
    continuity correction, as scipy's asymptotic method) for every column of x [n, m] and every class
    of y; ranks and ties are computed once for all classes. Returns two [m, n_classes] arrays."""
    n, m = x.shape
    r = rankdata(x, axis=0)
    tie = _tie_term(x)
    auc, p = np.full((m, n_classes), 0.5), np.ones((m, n_classes))
    for e in range(n_classes):
        pos = y == e
        n1 = int(pos.sum())
        n0 = n - n1
        if n1 == 0 or n0 == 0:
            continue
        u = r[pos].sum(0) - n1 * (n1 + 1) / 2
        auc[:, e] = u / (n1 * n0)
        sigma = np.sqrt(n1 * n0 / 12 * ((n + 1) - tie / (n * (n - 1))))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(sigma > 0, (np.abs(u - n1 * n0 / 2) - 0.5) / sigma, 0.0)
        p[:, e] = np.where(sigma > 0, 2 * norm.sf(np.maximum(z, 0)), 1.0)
    return auc, p


def auroc(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of every column of x [n, m] for separating pos (bool [n]) from the rest (ties count 1/2)."""
    return rank_tests(x, pos.astype(int), 2)[0][:, 1]


def mannwhitney_p(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Two-sided Mann-Whitney p-values of every column of x, pos vs rest."""
    return rank_tests(x, pos.astype(int), 2)[1][:, 1]


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (any shape; adjusted over all entries)."""
    flat = p.ravel()
    order = np.argsort(flat)
    ranked = flat[order] * len(flat) / np.arange(1, len(flat) + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(flat)
    out[order] = adj
    return out.reshape(p.shape)


@profiling.timed("statistics")
def eta_squared(x: np.ndarray, groups: np.ndarray, adjusted: bool = True) -> np.ndarray:
    """Share of each column's variance explained by group membership (one-way ANOVA eta^2), per column;
    `adjusted` removes the part expected by chance with many small groups (as adjusted R^2 does)."""
    n = len(x)
    _, g = np.unique(groups, return_inverse=True)
    k = g.max() + 1
    counts = np.bincount(g, minlength=k).astype(float)
    # per-group column sums as a sparse indicator matmul (np.add.at took 3/4 of the phases stage's statistics)
    sums = np.asarray(sparse.csr_matrix((np.ones(n), (g, np.arange(n))), shape=(k, n)) @ x, dtype=float)
    mean = x.mean(0)
    ss_between = (sums ** 2 / counts[:, None]).sum(0) - n * mean ** 2
    ss_total = ((x - mean) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.where(ss_total > 0, ss_between / ss_total, 0.0)
    if adjusted and n > k:
        eta = 1 - (1 - eta) * (n - 1) / (n - k)
    return eta


@profiling.timed("statistics")
def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) between two representations of the same n examples."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    hsic = np.linalg.norm(a.T @ b) ** 2
    return float(hsic / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


@profiling.timed("statistics:probes")
def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, shuffle_labels: bool = False) -> float:
    """Cross-validated accuracy of a standardised logistic-regression probe (labels optionally shuffled)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    x = x[:, x.std(0) > 0]  # constant columns (silent SAE features) carry nothing and cost time
    if x.shape[1] == 0:
        return float(np.bincount(y).max() / len(y))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def interval(value: float, boot) -> dict:
    """A value with the percentile 95% interval of its bootstrap replicates."""
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": float(value), "lo": float(lo), "hi": float(hi)}


@profiling.timed("statistics")
def mean_ci(x: np.ndarray, rng, n_boot: int) -> dict:
    """Mean of x with a percentile-bootstrap 95% interval over its entries, and n."""
    boot = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    return {**interval(x.mean(), boot), "n": int(len(x))}


def concentration(effects) -> dict:
    """How concentrated positive effects are: effective number of features (sum^2 / sum of squares)
    and the Gini index."""
    e = np.clip(np.asarray(effects, float), 0, None)
    if e.sum() <= 0:
        return {"effective_n": 0.0, "gini": float("nan")}
    s = np.sort(e)
    n = len(s)
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(s) / (n * s.sum()))
    return {"effective_n": float(e.sum() ** 2 / (e ** 2).sum()), "gini": gini}
