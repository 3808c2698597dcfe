"""One training step of a TopK SAE with hand-written sparse gradients (no autograd).

One matmul is dense: the encoder (in bfloat16 where the CPU/GPU has fast bf16; parameters, decoding
and updates stay float32); AuxK takes its top dead latents from the same pre-activations. Everything
else touches just the k active latents per token: decoding through embedding_bag, the gradient into
the active latents as a sampled matmul (only the B x k entries of grad @ W_dec^T that are needed),
the weight gradients as sparse-dense matmuls over a latent-major (CSR) pattern built once per set of
indices. Autograd through a dense decode would cost two more [tokens x d_in x d_sae] matmuls per step
and keep dense [tokens x d_sae] intermediates alive. `tests/test_sae_train.py` checks these gradients
against autograd; `bench/sae_train.py` times the step against a matmul of the encoder's shape.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class StepOut(NamedTuple):
    mse: torch.Tensor
    """Mean squared error per token, summed over dimensions."""
    aux: torch.Tensor
    """AuxK loss (normalised), 0 when no latent is dead."""
    fired: torch.Tensor
    """[d_sae] bool: latents active in this batch."""
    l0: float


def _outer(idx: torch.Tensor, tokens: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, m: int) -> torch.Tensor:
    """sum_e e_{idx[e]} vals[e] dense[tokens[e]]^T -> [m, d] over flat entries e: a sparse-dense matmul with
    the [m, n_tokens] pattern stored latent-major (CSR), so no [entries, d] tensor is formed."""
    order = torch.argsort(idx, stable=True)
    crow = torch.zeros(m + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(idx, minlength=m).cumsum(0)
    S = torch.sparse_csr_tensor(crow, tokens[order], vals[order], (m, len(dense)), check_invariants=False)
    return S @ dense


def _rows(B: int, k: int, device, first: int = 0) -> torch.Tensor:
    """Token index of each entry of a [B, k] index tensor, flattened (offset by `first`)."""
    return torch.arange(first, first + B, device=device).repeat_interleave(k)


def _active_dots(g: torch.Tensor, W_dec: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, k]: g[b] . W_dec[idx[b, j]], the entries of g @ W_dec^T at the active latents only (a sampled
    dense-dense matmul; the full product would be a [B x d x d_sae] matmul)."""
    B, k = idx.shape
    cols, order = idx.sort(-1)
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    S = torch.sparse_csr_tensor(crow, cols.reshape(-1), torch.zeros(B * k, dtype=g.dtype, device=g.device),
                                (B, W_dec.shape[0]), check_invariants=False)
    vals = torch.sparse.sampled_addmm(S, g, W_dec.T, beta=0.0).values().view(B, k)
    return torch.empty_like(vals).scatter_(1, order, vals)


def _decode(idx, acts, W_dec):
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


def _mm(a, b, fast_dtype):
    """a @ b in the fast dtype (bf16 on AMX / tensor cores); the result stays in that dtype."""
    return a.to(fast_dtype) @ b.to(fast_dtype)


def _encode_topk(xc, W_enc, b_enc, k, fast_dtype):
    """Indices and (float32) values of the k largest pre-activations."""
    vals, idx = _mm(xc, W_enc, fast_dtype).add_(b_enc.to(fast_dtype)).topk(k, dim=-1, sorted=False)
    return idx, vals.float()


def _dead_topk(pre: torch.Tensor, dead: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations among the dead latents only (their columns picked first)."""
    cols = dead.nonzero().squeeze(1)
    vals, i = pre.index_select(1, cols).topk(k, dim=-1, sorted=False)
    return cols[i], vals.float()


@torch.no_grad()
def topk_grads(x, W_enc, b_enc, W_dec, b_dec, k: int, dead: torch.Tensor | None = None, aux_k: int = 0,
               aux_coef: float = 1 / 32, fast_dtype=torch.float32) -> tuple[StepOut, dict]:
    """Loss and gradients of mean ||x - recon||^2 (+ aux_coef * AuxK on dead latents)."""
    B, d = x.shape
    m = W_dec.shape[0]
    xc = x - b_dec
    pre = _mm(xc, W_enc, fast_dtype).add_(b_enc.to(fast_dtype))  # the one dense matmul
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    vals = vals.float()
    acts = vals.relu()
    recon = _decode(idx, acts, W_dec) + b_dec
    err = recon - x
    mse = err.pow(2).sum(-1).mean()
    g_rec = 2 * err / B  # dL/drecon
    g_pre = _active_dots(g_rec, W_dec, idx) * (vals > 0)
    # decoder rows of active latents (main and AuxK: one sparse matmul over both), encoder rows likewise
    dec_idx, dec_tok, dec_val, dec_dense = [idx.reshape(-1)], [_rows(B, k, x.device)], [acts.reshape(-1)], [g_rec]
    enc_idx, enc_g = [idx], [g_pre]
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    if dead is not None and aux_k > 0 and int(dead.sum()) > 0:
        ka = min(aux_k, int(dead.sum()))
        a_idx, a_vals = _dead_topk(pre, dead, ka)
        a_acts = a_vals.relu()
        target = -err.detach()  # what the main reconstruction missed
        denom = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        a_err = _decode(a_idx, a_acts, W_dec) - target
        aux = a_err.pow(2).sum(-1).mean() / denom
        g_a = aux_coef * 2 * a_err / (B * denom)
        dec_idx.append(a_idx.reshape(-1))
        dec_tok.append(_rows(B, ka, x.device, B))
        dec_val.append(a_acts.reshape(-1))
        dec_dense.append(g_a)
        enc_idx.append(a_idx)
        enc_g.append(_active_dots(g_a, W_dec, a_idx) * (a_vals > 0))
    g_W_dec = _outer(torch.cat(dec_idx), torch.cat(dec_tok), torch.cat(dec_val), torch.cat(dec_dense), m)
    i, g = torch.cat(enc_idx, 1), torch.cat(enc_g, 1)
    g_W_enc_T = _outer(i.reshape(-1), _rows(B, i.shape[1], x.device), g.reshape(-1), xc, m)
    g_b_enc = torch.zeros_like(b_enc).index_add_(0, i.reshape(-1), g.reshape(-1))
    g_xc = _decode(i, g, W_enc.T)
    # b_dec enters twice: added to the reconstruction, subtracted from the input
    g_b_dec = g_rec.sum(0) - g_xc.sum(0)
    fired = torch.zeros(m, dtype=torch.bool, device=x.device)
    fired[idx[vals > 0]] = True
    l0 = float((vals > 0).sum(-1).float().mean())
    grads = {"W_enc": g_W_enc_T.T, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    return StepOut(mse.detach(), aux.detach(), fired, l0), grads
