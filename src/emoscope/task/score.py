"""Label scoring: the log-probability of every full label string after a prompt.

Fast path: the token prefix shared by all prompts (instruction and demonstrations) is run once and
its KV cache reused; each batch of prompts then runs only its own suffix (left-padded *between*
prefix and suffix, with explicit position ids), and the label continuations run on the cached
prompts, all labels of a batch at once. Multi-token labels count in full. `score_naive` is the
reference: one full forward per (prompt, label).
"""

from __future__ import annotations


import numpy as np
import torch

from .. import distributed as dist
from ..hooks import HookPoint, pad_after_prefix, prefix_cache, record, repeat_cache, resid
from ..prefix import common_prefix as _common_prefix, sliding_window
from ..backends.base import Backend



@torch.no_grad()
def score_ids(view: Backend, prompts: list[list[int]], labels: list[list[int]], batch_size: int = 8,
              progress=None, resid_layers: list[int] = ()):
    """[n_prompts, n_labels] summed log-probs of each label's tokens given each prompt's tokens. With
    `resid_layers`, also the residual stream at each prompt's last token (the answer position) of those
    layers, {layer: [n_prompts, d]} float32, read from the same forwards."""
    model, dev = view.model, view.device
    n_lab, max_lab = len(labels), max(len(lab) for lab in labels)
    P = _common_prefix(prompts)
    shared = prefix_cache(view, prompts[0][:P]) if P > 0 else None
    result = np.zeros((len(prompts), n_lab), dtype=np.float64)
    res = {layer: np.zeros((len(prompts), view.d_model), dtype=np.float32) for layer in resid_layers}
    first_tok = torch.tensor([lab[0] for lab in labels], device=dev)
    longest = max(len(p) for p in prompts) + max_lab
    batches = _batches([len(p) - P for p in prompts], batch_size, equal=longest > sliding_window(model))
    for rows in batches[dist.rank()::dist.world_size()]:  # with several ranks, every rank its share
        B = len(rows)
        ids, mask, pos = pad_after_prefix([prompts[r][P:] for r in rows], P, dev)
        cache = None if shared is None else repeat_cache(shared, B)
        with record(view, [HookPoint(layer) for layer in resid_layers]) as acts:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=max_lab > 1, logits_to_keep=1)
        for layer in resid_layers:  # suffixes are left-padded: every row's last token is its answer position
            res[layer][rows] = acts[resid(layer)][:, -1].float().cpu().numpy()
        lp = torch.log_softmax(out.logits[:, -1].float(), -1)
        scores = lp[:, first_tok]  # [B, n_lab]
        if max_lab > 1:
            scores = scores + _continuations(model, out.past_key_values, mask, pos[:, -1] + 1, labels, dev)
        result[rows] = scores.double().cpu().numpy()
        if progress:
            progress(B)
    # each row was filled by exactly one rank (zeros elsewhere): the sum is exact
    total = dist.all_sum(torch.from_numpy(result)).numpy()
    if not resid_layers:
        return total
    return total, {layer: dist.all_sum(torch.from_numpy(r)).numpy() for layer, r in res.items()}


def _batches(lengths: list[int], size: int, equal: bool) -> list[list[int]]:
    """Row indices in batches, sorted by length to cut padding. Past a sliding window the padding
    gap would shift the window, so there each batch holds suffixes of one length only."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size and (not equal or lengths[out[-1][0]] == lengths[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _continuations(model, cache, mask, next_pos, labels, dev) -> torch.Tensor:
    """Log-probs of label tokens 2..m, every label of every prompt in one batch on the shared cache."""
    B, K, M = mask.shape[0], len(labels), max(len(lab) for lab in labels) - 1
    cache.batch_repeat_interleave(K)  # rows: prompt-major, label-minor
    ids = torch.zeros((B * K, M), dtype=torch.long, device=dev)
    tgt = torch.zeros((B * K, M), dtype=torch.long, device=dev)
    valid = torch.zeros((B * K, M), dtype=torch.bool, device=dev)
    for k, lab in enumerate(labels):
        m = len(lab) - 1
        if m:
            ids[k::K, :m] = torch.tensor(lab[:-1], device=dev)
            tgt[k::K, :m] = torch.tensor(lab[1:], device=dev)
            valid[k::K, :m] = True
    # label tokens past the first feed in; padding after a short label is masked out
    ids_mask = torch.cat([mask.repeat_interleave(K, 0), valid.long()], 1)
    pos = next_pos.repeat_interleave(K)[:, None] + torch.arange(M, device=dev)[None]
    out = model(input_ids=ids, attention_mask=ids_mask, position_ids=pos, past_key_values=cache, use_cache=False)
    lp = torch.log_softmax(out.logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
    return (lp * valid).sum(-1).view(B, K)


@torch.no_grad()
def score_naive(view: Backend, prompts: list[list[int]], labels: list[list[int]]) -> np.ndarray:
    """Reference: one full forward over prompt + label for every (prompt, label) pair (logits kept
    only at the label positions, as any sensible per-label implementation would)."""
    out = np.zeros((len(prompts), len(labels)))
    for i, p in enumerate(prompts):
        for k, lab in enumerate(labels):
            ids = torch.tensor([p + lab], device=view.device)
            logits = view.model(input_ids=ids, logits_to_keep=len(lab) + 1).logits[0, :-1]
            lp = torch.log_softmax(logits.float(), -1)
            out[i, k] = sum(lp[j, t].item() for j, t in enumerate(lab))
    return out
