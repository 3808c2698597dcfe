"""One training step of a TopK SAE with hand-written sparse gradients (no autograd).

Two matmuls are dense: the encoder and the gradient into the active features (both in bfloat16
where the CPU/GPU has fast bf16; parameters, decoding and updates stay float32). Decoding and the
weight gradients touch just the k active features per token, through embedding_bag and sparse-dense
matmuls. Autograd through a dense decode would cost two more [tokens x d_in x d_sae] matmuls per step
and keep dense [tokens x d_sae] intermediates alive. `tests/test_sae_train.py` checks
these gradients against autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class StepOut(NamedTuple):
    mse: torch.Tensor
    """Mean squared error per token, summed over dimensions."""
    aux: torch.Tensor
    """AuxK loss (normalised), 0 when no latent is dead."""
    fired: torch.Tensor
    """[d_sae] bool: latents active in this batch."""
    l0: float


def _outer(idx, vals, dense, m):
    """sum_b sum_j e_{idx[b,j]} vals[b,j] dense[b]^T  ->  [m, d], as a sparse-dense matmul (no [B,k,d] tensor)."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(k)
    S = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), vals.reshape(-1), (m, B), check_invariants=False)
    return torch.sparse.mm(S, dense)


def _decode(idx, acts, W_dec):
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


def _mm(a, b, fast_dtype):
    """a @ b in the fast dtype (bf16 on AMX / tensor cores); the result stays in that dtype."""
    return a.to(fast_dtype) @ b.to(fast_dtype)


def _encode_topk(xc, W_enc, b_enc, k, fast_dtype, mask=None):
    """Indices and (float32) values of the k largest pre-activations."""
    pre = _mm(xc, W_enc, fast_dtype).add_(b_enc.to(fast_dtype))
    if mask is not None:
        pre = pre.masked_fill_(~mask, float("-inf"))
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return idx, vals.float()


@torch.no_grad()
def topk_grads(x, W_enc, b_enc, W_dec, b_dec, k: int, dead: torch.Tensor | None = None, aux_k: int = 0,
               aux_coef: float = 1 / 32, fast_dtype=torch.float32) -> tuple[StepOut, dict]:
    """Loss and gradients of mean ||x - recon||^2 (+ aux_coef * AuxK on dead latents)."""
    B, d = x.shape
    xc = x - b_dec
    idx, vals = _encode_topk(xc, W_enc, b_enc, k, fast_dtype)
    acts = vals.relu()
    recon = _decode(idx, acts, W_dec) + b_dec
    err = recon - x
    mse = err.pow(2).sum(-1).mean()
    g_rec = 2 * err / B  # dL/drecon
    # decoder: only rows of active latents receive gradient
    m = W_dec.shape[0]
    g_W_dec = _outer(idx, acts, g_rec, m)
    g_dense = _mm(g_rec, W_dec.T, fast_dtype)  # one matmul beats gathering [B, k, d] decoder rows
    g_acts = g_dense.gather(-1, idx).float()
    g_pre = g_acts * (vals > 0)
    idx_all, g_pre_all, xc_rows = [idx], [g_pre], g_rec.sum(0)
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    if dead is not None and aux_k > 0 and int(dead.sum()) > 0:
        ka = min(aux_k, int(dead.sum()))
        a_idx, a_vals = _encode_topk(xc, W_enc, b_enc, ka, fast_dtype, mask=dead[None, :])
        a_acts = a_vals.relu()
        target = -err.detach()  # what the main reconstruction missed
        denom = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        a_err = _decode(a_idx, a_acts, W_dec) - target
        aux = a_err.pow(2).sum(-1).mean() / denom
        g_a = aux_coef * 2 * a_err / (B * denom)
        g_W_dec += _outer(a_idx, a_acts, g_a, m)
        idx_all.append(a_idx)
        g_pre_all.append(_mm(g_a, W_dec.T, fast_dtype).gather(-1, a_idx).float() * (a_vals > 0))
    g_W_enc_T = torch.zeros_like(W_enc.T)
    g_b_enc = torch.zeros_like(b_enc)
    g_xc = torch.zeros_like(x)
    for i, g in zip(idx_all, g_pre_all):
        g_W_enc_T += _outer(i, g, xc, m)
        g_b_enc.index_add_(0, i.reshape(-1), g.reshape(-1))
        g_xc += _decode(i, g, W_enc.T)
    # b_dec enters twice: added to the reconstruction, subtracted from the input
    g_b_dec = xc_rows - g_xc.sum(0)
    fired = torch.zeros(W_dec.shape[0], dtype=torch.bool, device=x.device)
    fired[idx[vals > 0]] = True
    l0 = float((vals > 0).sum(-1).float().mean())
    grads = {"W_enc": g_W_enc_T.T, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    return StepOut(mse.detach(), aux.detach(), fired, l0), grads
