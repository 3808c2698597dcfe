"""Per-layer statistics from captured activations and SAE codes — model-free, so that a planted test
can feed synthetic arrays with known answers.

For each layer:
- emotion selectivity of every SAE feature at the final prompt token: AUROC one emotion vs the rest,
  Mann-Whitney p-values, Benjamini-Hochberg over all features x emotions; a feature is selective for
  an emotion when its FDR-adjusted p < `fdr` and AUROC >= `min_auroc`;
- surface score: how much of an active feature's variance over text tokens is explained by the token
  identity (adjusted eta^2, averaged over features weighted by variance);
- semantic score: the same, explained by which text (example) the token is in, beyond chance;
- CKA of the final-token residual with the previous layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import bh_fdr, eta_squared, linear_cka, rank_tests


@dataclass
class Selectivity:
    auroc: np.ndarray      # [m, E]
    p_adj: np.ndarray      # [m, E]
    selective: np.ndarray  # [m, E] bool

    @property
    def n_emotions(self) -> np.ndarray:
        return self.selective.sum(1)


def selectivity(codes: np.ndarray, y: np.ndarray, n_classes: int, fdr: float = 0.05,
                min_auroc: float = 0.7) -> Selectivity:
    """Which features separate each emotion from the rest (codes [n, m], y [n] in 0..E-1)."""
    live = codes.std(0) > 0  # features silent on every example: AUROC 0.5, p = 1, never selective
    au = np.full((codes.shape[1], n_classes), 0.5)
    p = np.ones_like(au)
    au[live], p[live] = rank_tests(codes[:, live], y, n_classes)
    p_adj = bh_fdr(p)
    return Selectivity(au, p_adj, (p_adj < fdr) & (au >= min_auroc))


def _weighted_eta(codes: np.ndarray, groups: np.ndarray, min_active: int = 5) -> float:
    active = (codes > 0).sum(0) >= min_active
    if not active.any():
        return float("nan")
    x = codes[:, active]
    var = x.var(0)
    return float((eta_squared(x, groups) * var).sum() / var.sum())


def text_scores(codes_text: np.ndarray, token_ids: np.ndarray, example_idx: np.ndarray) -> tuple[float, float]:
    """(surface, semantic): variance of feature activations over text tokens explained by the token's
    identity, and by the text it sits in (both adjusted for chance)."""
    return _weighted_eta(codes_text, token_ids), _weighted_eta(codes_text, example_idx)


def layer_row(L: int, codes_last: np.ndarray, codes_text: np.ndarray, resid_last: np.ndarray,
              resid_prev: np.ndarray | None,
              token_ids: np.ndarray, example_idx: np.ndarray, y: np.ndarray, n_classes: int,
              fdr: float = 0.05, min_auroc: float = 0.7) -> tuple[dict, Selectivity]:
    """The statistics of one layer, and its selectivity arrays."""
    sel = selectivity(codes_last, y, n_classes, fdr, min_auroc)
    surface, semantic = text_scores(codes_text, token_ids, example_idx)
    k = sel.n_emotions
    row = {"layer": L, "n_features": int(codes_last.shape[1]),
           "n_selective": int((k > 0).sum()), "n_specific": int((k == 1).sum()), "n_shared": int((k > 1).sum()),
           "selective_frac": float((k > 0).mean()), "surface": surface, "semantic": semantic,
           "cka_prev": linear_cka(resid_prev, resid_last) if resid_prev is not None else float("nan")}
    return row, sel


def layer_table(codes_last: list[np.ndarray], codes_text: list[np.ndarray], resid_last: list[np.ndarray],
                token_ids: np.ndarray, example_idx: np.ndarray, y: np.ndarray, n_classes: int,
                fdr: float = 0.05, min_auroc: float = 0.7) -> tuple[list[dict], list[Selectivity]]:
    """One row of statistics per layer, and each layer's selectivity arrays."""
    out = [layer_row(L, codes_last[L], codes_text[L], resid_last[L], resid_last[L - 1] if L else None,
                     token_ids, example_idx, y, n_classes, fdr, min_auroc) for L in range(len(codes_last))]
    return [r for r, _ in out], [s for _, s in out]
