"""Causal machinery for SAE features at the answer position: the label-margin metric, attribution
patching (gradient x activation for every feature of every layer from one backward pass), and exact
interventions that keep the SAE error term (so an intervention that changes nothing leaves the
model's output exactly as it was).

Splicing an SAE with its error term at layer L replaces the residual x by decode(f) + (x - decode(f)):
the identity. Changing features f -> f' therefore adds (f' - f) @ W_dec to the residual at that
position, and nothing else; no re-encoding, no reconstruction error leaking in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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


def first_token_prior(view: ModelView, task, tokens: list[int]) -> torch.Tensor:
    """Contextual-calibration prior over the labels' first tokens: the mean label distribution of the
    task's prompt on content-free inputs, in log space [K]."""
    from ..calibrate import CONTENT_FREE
    prompts = [task.builder.encode(task.builder.prompt(t)) for t in CONTENT_FREE]
    ids, mask = pad_batch(prompts, view.device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=view.device)
    with torch.no_grad():
        logits, _ = answer_logits(view, ids, mask, last, tokens)
    lp = torch.log_softmax(logits, -1)
    return torch.logsumexp(lp, 0) - np.log(len(prompts))


def answer_logits(view: ModelView, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, tokens: list[int],
                  record_layers: list[int] = (), past=None, pos: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Label first-token logits at each row's answer position `last` [n, K], and the residuals
    [n, T, d] of the given layers (kept in the graph, for gradients). With `past` (a KV cache of the
    tokens before `ids`, used up) and `pos` (their position ids), only `ids` run."""
    from ..capture import record

    layers = sorted(set(record_layers) | {view.n_layers - 1})
    with record(view, [HookPoint(l) for l in layers], detach=False) as acts:
        # the base model, without the LM head: only the label tokens' logits are needed
        view.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                              use_cache=past is not None)
    rows = torch.arange(len(ids))
    final = acts[f"blocks.{view.n_layers - 1}.hook_resid_post"][rows, last]
    logits = view.logits_from_resid(final, tokens).float()
    return logits, {l: acts[f"blocks.{l}.hook_resid_post"] for l in record_layers}


def prompt_batches(view: ModelView, prompts: list[list[int]], batch_size: int = 8):
    """(start, ids, mask, last) for consecutive batches of token lists, right-padded; `last` is each
    row's answer position (its final real token)."""
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = pad_batch(chunk, view.device)
        yield i, ids, mask, torch.tensor([len(p) - 1 for p in chunk], device=view.device)


@dataclass
class AnswerBatch:
    """Prompts whose answer position runs again and again (every ablation, every steering strength).
    With `cache`, everything before each row's answer token already ran once and its KV cache is
    kept: a pass runs the answer tokens only. Exact, because every intervention here acts at the
    answer position and attention is causal, so no earlier position can change."""
    start: int  # index of the first row in the prompt list
    ids: torch.Tensor  # [B, 1] answer tokens (cached) or [B, T] whole prompts, right-padded
    mask: torch.Tensor  # attention mask over cached tokens + ids
    last: torch.Tensor  # answer position of each row within ids
    pos: torch.Tensor | None = None  # position ids of ids, when cached
    cache: object | None = None

    def logits(self, view: ModelView, tokens: list[int], record_layers: list[int] = ()):
        past = None if self.cache is None else copy.deepcopy(self.cache)
        return answer_logits(view, self.ids, self.mask, self.last, tokens, record_layers, past, self.pos)


@torch.no_grad()
def answer_batches(view: ModelView, prompts, batch_size: int = 16) -> list[AnswerBatch]:
    """The prompts in consecutive batches, each prompt's tokens before its answer token run once and
    cached (left-padded, explicit positions). Call it with no hooks active. Prompts longer than the
    smallest sliding attention window run whole (left padding would shift the window); a list that
    already holds AnswerBatch objects is returned as it is."""
    from ..score import _sliding_window

    if prompts and isinstance(prompts[0], AnswerBatch):
        return prompts
    if max(len(p) for p in prompts) > _sliding_window(view.model) or min(len(p) for p in prompts) < 2:
        return [AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(view, prompts, batch_size)]
    dev, out = view.device, []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        B, S = len(chunk), max(len(p) for p in chunk) - 1
        ids = torch.zeros((B, S), dtype=torch.long, device=dev)
        mask = torch.zeros((B, S + 1), dtype=torch.long, device=dev)
        pos = torch.zeros((B, S), dtype=torch.long, device=dev)
        for r, p in enumerate(chunk):
            n = len(p) - 1
            ids[r, S - n:] = torch.tensor(p[:-1], device=dev)
            mask[r, S - n:] = 1
            pos[r, S - n:] = torch.arange(n, device=dev)
        cache = view.model.base_model(input_ids=ids, attention_mask=mask[:, :S], position_ids=pos,
                                      use_cache=True).past_key_values
        out.append(AnswerBatch(i, torch.tensor([[p[-1]] for p in chunk], device=dev), mask,
                               torch.zeros(B, dtype=torch.long, device=dev),
                               torch.tensor([[len(p) - 1] for p in chunk], device=dev), cache))
    return out


def attribution(view: ModelView, saes: dict, prompts: list[list[int]], gold: np.ndarray, tokens: list[int],
                log_prior: torch.Tensor | None = None, baseline: dict[int, torch.Tensor] | None = None,
                batch_size: int = 16, kind: str = "best_other") -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Attribution patching: for every example and feature, grad(margin) . (baseline - f) @ W_dec at the
    answer position — the first-order estimate of the margin change when the feature is set to the
    baseline (zero when none given). `prompts` may be answer_batches(). Returns {layer: [n, d_sae]}
    and the clean margins [n]."""
    layers = sorted(saes)
    out = {l: [] for l in layers}
    margins = []
    for b in answer_batches(view, prompts, batch_size):
        g = torch.as_tensor(gold[b.start:b.start + len(b.ids)], device=view.device)
        rows, last = torch.arange(len(b.ids), device=view.device), b.last
        with torch.enable_grad():
            logits, res = b.logits(view, tokens, layers)
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
           baseline: dict[int, torch.Tensor] | None = None, batch_size: int = 16, kind: str = "best_other") -> np.ndarray:
    """Exact intervention: the margin of every example [n] with the given features (per layer) set to
    the baseline (zero when none) at the answer position, SAE error terms kept. `prompts` may be
    answer_batches(), built once and reused across interventions."""
    margins = []
    for b in answer_batches(view, prompts, batch_size):
        g = torch.as_tensor(gold[b.start:b.start + len(b.ids)], device=view.device)
        with set_features(view, saes, features, b.last, baseline):
            logits, _ = b.logits(view, tokens)
        margins.append(margin(logits, g, log_prior, kind).cpu().numpy())
    return np.concatenate(margins)
