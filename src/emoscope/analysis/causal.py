"""Causal machinery for SAE features at the answer position: the label-margin metric, attribution
patching (gradient x activation for every feature of every layer from one backward pass), and exact
interventions that keep the SAE error term (so an intervention that changes nothing leaves the
model's output exactly as it was).

Splicing an SAE with its error term at layer L replaces the residual x by decode(f) + (x - decode(f)):
the identity. Changing features f -> f' therefore adds (f' - f) @ W_dec to the residual at that
position, and nothing else; no re-encoding, no reconstruction error leaking in.
"""

from __future__ import annotations

import numpy as np
import torch

from ..capture import HookPoint
from ..models import ModelView
from ..sae.evaluate import pad_batch


MARGINS = ("best_other", "all_others")


def margin(label_logp: torch.Tensor, gold: torch.Tensor, log_prior: torch.Tensor | None = None,
           kind: str = "best_other") -> torch.Tensor:
    """Calibrated margin of the gold label over the labels' first-token log-probs [n, K] (renormalised
    over labels, minus the log prior when given). `best_other`: log p(gold) - max_{other} log p(other),
    positive exactly when the calibrated first-token prediction is gold; `all_others`: the log-odds
    log p(gold) - log sum_{other} p(other), which is negative whenever p(gold) < 1/2 even when gold wins."""
    if kind not in MARGINS:
        raise ValueError(f"unknown margin {kind!r}; expected one of {MARGINS}")
    lp = torch.log_softmax(label_logp, -1)
    if log_prior is not None:
        lp = torch.log_softmax(lp - log_prior, -1)
    other = lp.masked_fill(torch.nn.functional.one_hot(gold, lp.shape[-1]).bool(), float("-inf"))
    rest = other.max(-1).values if kind == "best_other" else torch.logsumexp(other, -1)
    return lp.gather(-1, gold[:, None])[:, 0] - rest


def set_features(view: ModelView, saes: dict, features: dict[int, list[int]], positions: torch.Tensor,
                 baseline: dict[int, torch.Tensor] | None = None):
    """Context manager: at positions[b] of each row and after each listed block, set the listed SAE
    features to the baseline (zero when none), keeping the error term. An ablation is a steering
    that clamps features, so this is `steer` with clamp edits; features are read from the residual
    as it is at that point, so interventions at several layers compose."""
    from .steer import Edit, steer

    edits = [Edit(layer=l, feature=int(f), mode="clamp",
                  value=0.0 if baseline is None else float(baseline[l].reshape(-1)[f]))
             for l, fs in features.items() for f in fs]
    return steer(view, saes, edits, positions)


def answer_logits(view: ModelView, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, tokens: list[int],
                  record_layers: list[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Label first-token logits at each row's last real token [n, K], and the full residuals
    [n, T, d] of the given layers (kept in the graph, for gradients)."""
    from ..capture import record

    layers = sorted(set(record_layers) | {view.n_layers - 1})
    with record(view, [HookPoint(l) for l in layers], detach=False) as acts:
        view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    rows = torch.arange(len(ids))
    final = acts[f"blocks.{view.n_layers - 1}.hook_resid_post"][rows, last]
    logits = view.logits_from_resid(final)[:, tokens].float()
    return logits, {l: acts[f"blocks.{l}.hook_resid_post"] for l in record_layers}


def prompt_batches(view: ModelView, prompts: list[list[int]], batch_size: int = 8):
    """(start, ids, mask, last) for consecutive batches of token lists, right-padded; `last` is each
    row's answer position (its final real token)."""
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = pad_batch(chunk, view.device)
        yield i, ids, mask, torch.tensor([len(p) - 1 for p in chunk], device=view.device)


def attribution(view: ModelView, saes: dict, prompts: list[list[int]], gold: np.ndarray, tokens: list[int],
                log_prior: torch.Tensor | None = None, baseline: dict[int, torch.Tensor] | None = None,
                batch_size: int = 8, kind: str = "best_other") -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Attribution patching: for every example and feature, grad(margin) . (baseline - f) @ W_dec at the
    answer position — the first-order estimate of the margin change when the feature is set to the
    baseline (zero when none given). Returns {layer: [n, d_sae]} and the clean margins [n]."""
    layers = sorted(saes)
    out = {l: [] for l in layers}
    margins = []
    for i, ids, mask, last in prompt_batches(view, prompts, batch_size):
        g = torch.as_tensor(gold[i:i + batch_size], device=view.device)
        rows = torch.arange(len(ids), device=view.device)
        with torch.enable_grad():
            logits, res = answer_logits(view, ids, mask, last, tokens, layers)
            m = margin(logits, g, log_prior, kind)
            grads = torch.autograd.grad(m.sum(), [res[l] for l in layers])
        margins.append(m.detach().cpu().numpy())
        for l, gfull in zip(layers, grads):
            sae = saes[l]
            x = res[l].detach()[rows, last].float()
            gx = gfull[rows, last]
            f = sae.encode(x)
            base = torch.zeros_like(f) if baseline is None else baseline[l].expand_as(f)
            g_f = gx.float() @ sae.W_dec.detach().T  # d margin / d f = W_dec grad_x (decode is linear)
            out[l].append(((base - f) * g_f).detach().cpu().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}, np.concatenate(margins)


@torch.no_grad()
def ablate(view: ModelView, saes: dict, prompts: list[list[int]], gold: np.ndarray, tokens: list[int],
           features: dict[int, list[int]], log_prior: torch.Tensor | None = None,
           baseline: dict[int, torch.Tensor] | None = None, batch_size: int = 8, kind: str = "best_other") -> np.ndarray:
    """Exact intervention: the margin of every example [n] with the given features (per layer) set to
    the baseline (zero when none) at the answer position, SAE error terms kept."""
    margins = []
    for i, ids, mask, last in prompt_batches(view, prompts, batch_size):
        g = torch.as_tensor(gold[i:i + batch_size], device=view.device)
        with set_features(view, saes, features, last, baseline):
            logits, _ = answer_logits(view, ids, mask, last, tokens)
        margins.append(margin(logits, g, log_prior, kind).cpu().numpy())
    return np.concatenate(margins)
