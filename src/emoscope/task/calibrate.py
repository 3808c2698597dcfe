"""Calibration of label scores: subtract a label prior, in log space, after normalising over labels.

Contextual calibration (Zhao et al., 2021): the prior is the model's label distribution for
content-free inputs ("N/A", "", "[MASK]") in the same prompt. Train-prior calibration estimates it
from real train texts instead. Both reduce to p_cal(y|x) ∝ p(y|x) / prior(y).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

CONTENT_FREE = ["N/A", "", "[MASK]"]


def normalize(logp: np.ndarray) -> np.ndarray:
    """Renormalise label log-probs over the label set (rows sum to one in probability)."""
    return log_softmax(np.asarray(logp, dtype=np.float64), axis=-1)


def prior_from_scores(logp: np.ndarray) -> np.ndarray:
    """Log of the mean label distribution (mean in probability space) over the given rows."""
    norm = normalize(logp)
    return logsumexp(norm, axis=0) - np.log(len(norm))


def apply_prior(logp: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """Calibrated, renormalised log-probs: log p(y|x) - log prior(y)."""
    return normalize(normalize(logp) - log_prior[None, :])
