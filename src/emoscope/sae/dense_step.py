"""Training losses for the dense architectures, through autograd: ReLU + L1, and JumpReLU with an L0
penalty and straight-through estimators for its threshold (Rajamanoharan et al., 2024).

These compute every [tokens x d_sae] product densely, so they are several times slower than the
TopK path; they exist for comparison and for users who want those architectures.
"""

from __future__ import annotations

import torch


def _rect(z: torch.Tensor) -> torch.Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = x * H(x - t); d f/d t = -(t / eps) * rect((x - t) / eps) (pseudo-derivative)."""

    @staticmethod
    def forward(ctx, x, t, eps):
        ctx.save_for_backward(x, t)
        ctx.eps = eps
        return x * (x > t)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        eps = ctx.eps
        g_x = g * (x > t)
        g_t = (-(t / eps) * _rect((x - t) / eps) * g).sum(0)
        return g_x, g_t, None


class _Step(torch.autograd.Function):
    """H(x - t); d H/d t = -(1 / eps) * rect((x - t) / eps)."""

    @staticmethod
    def forward(ctx, x, t, eps):
        ctx.save_for_backward(x, t)
        ctx.eps = eps
        return (x > t).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        eps = ctx.eps
        return None, (-(1.0 / eps) * _rect((x - t) / eps) * g).sum(0), None


def dense_loss(x, W_enc, b_enc, W_dec, b_dec, arch: str, log_threshold=None, sparsity_coef: float = 1.0,
               bandwidth: float = 0.05):
    """(loss, mse, l0, fired) for one batch; loss = mean ||x - recon||^2 + sparsity_coef * penalty."""
    pre = (x - b_dec) @ W_enc + b_enc
    if arch == "relu":
        acts = pre.relu()
        penalty = (acts * W_dec.norm(dim=1)).sum(-1).mean()  # L1 weighted by decoder norms
        active = acts > 0
    else:
        t = log_threshold.exp()
        acts = _JumpReLU.apply(pre.relu(), t, bandwidth)
        penalty = _Step.apply(pre.relu(), t, bandwidth).sum(-1).mean()  # L0
        active = acts > 0
    recon = acts @ W_dec + b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    return mse + sparsity_coef * penalty, mse.detach(), float(active.sum(-1).float().mean()), active.any(0)
