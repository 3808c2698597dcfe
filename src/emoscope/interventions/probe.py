"""Steering along probe directions (Tak et al. 2025): the span of the class-mean differences of the
residual at the answer position, a baseline for SAE feature steering."""

from __future__ import annotations

import numpy as np
import torch

from ..hooks import HookPoint, at, edit_output


class ProbeSteer:
    """Amplify the residual's component in the span of class-mean differences (dev set) by alpha."""

    def __init__(self, layer: int, resid: np.ndarray, y: np.ndarray):
        mu = resid.mean(0)
        means = np.stack([resid[y == e].mean(0) - mu for e in np.unique(y)])
        u, s, _ = np.linalg.svd(means.T, full_matrices=False)
        # numpy's matrix_rank tolerance at float32 precision (the residuals are float32): with balanced
        # classes the deviations sum to zero, and a tighter cut kept a round-off direction (singular value
        # ~1e-6 of the largest) that the steering then amplified
        tol = s.max() * max(means.shape) * np.finfo(np.float32).eps
        self.layer, self.mu = layer, torch.from_numpy(mu).float()
        self.U = torch.from_numpy(u[:, s > tol]).float()

    def context(self, view, alpha: float, positions: torch.Tensor):
        """Within the block, forwards have the residual at `positions` steered by alpha (1 = unchanged)."""
        def fn(t):
            x = t[at(t, positions)].float()
            mu, U = self.mu.to(x.device), self.U.to(x.device)
            t = t.clone()
            t[at(t, positions)] += ((alpha - 1) * ((x - mu) @ U) @ U.T).to(t.dtype)
            return t
        return edit_output(view, HookPoint(self.layer), fn)
