"""Feature cards: what one SAE feature responds to and what it writes, for a researcher to read.

`feature_cards(task, saes, features, examples)` returns, per (hook, feature), a card with
- its top-activating examples (by the largest activation over the text's tokens, and by the activation
  at the answer position, where the emotion is read) with the activation at every text token,
- the histogram of its nonzero activations over all text tokens and the share of tokens it fires on,
- the tokens its decoder direction promotes and suppresses most through the unembedding (logit
  weights, as SAEDashboard computes them: W_U @ W_dec[f], no final norm) and their histogram,
- its selectivity per emotion at the answer position (one-vs-rest AUROC and mean activation).
`neuronpedia_batch(cards, ...)` lays the cards of one SAE out as SAEDashboard's Neuronpedia batch JSON
(`model_id`, `layer`, `sae_set`, `features`: `feature_index`, `pos_str`/`pos_values`,
`neg_str`/`neg_values`, `frac_nonzero`, `freq_hist_data_*`, `logits_hist_data_*`, `activations`).
The activations come from one capture of the examples' prompts (text tokens and the final token), or
from the stores a phases stage already wrote.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..analysis.stats import rank_tests
from ..errors import EmoscopeError
from ..hooks import HookPoint
from ..store import Store, capture_to_stores

N_EXAMPLES, N_LOGITS, BINS = 5, 10, 20
STORES = ("store_last", "store_text")


def card_key(hook: str, feature: int) -> str:
    return f"{hook}/{feature}"


def capture_examples(task, examples, hooks: list[HookPoint], work: Path) -> tuple[Store, Store]:
    """The final prompt token's and every text token's activations at `hooks`, into two stores."""
    modes = ("last", "text")
    enc = {m: [task.positions(e.text, m) for e in examples] for m in modes}
    stores = capture_to_stores(task.model, [ids for ids, _ in enc["last"]], {m: [p for _, p in enc[m]] for m in modes},
                               [e.id for e in examples], hooks, {m: work / name for m, name in zip(modes, STORES)})
    return stores["last"], stores["text"]


def feature_cards(task, saes: dict, features: list[tuple[str, int]], examples, labels: list[str],
                  stores: tuple[Store, Store] | None = None) -> dict[str, dict]:
    """card_key(hook, feature) -> card (see the module docstring) for each requested feature, over
    `examples` (their first label is the gold one). `stores`: (last, text) stores of these examples at
    those hooks, e.g. the phases stage's; captured into a temporary folder when None."""
    hooks = sorted({h for h, _ in features}, key=lambda h: HookPoint.parse(h).layer)
    if not hooks:
        return {}
    if stores is None:
        with tempfile.TemporaryDirectory(prefix="emoscope-cards-") as tmp:
            stores = capture_examples(task, examples, [HookPoint.parse(h) for h in hooks], Path(tmp))
            return feature_cards(task, saes, features, examples, labels, stores)
    last, text = stores
    if len(last) != len(examples):
        raise EmoscopeError(f"activation store {last.path} has {len(last)} rows for {len(examples)} examples")
    y = np.array([labels.index(e.label) for e in examples])
    tok, ex = text.read("token_ids").numpy(), text.read("example_idx").numpy()
    W_U = task.model.unembed.weight.detach().float()
    cards = {}
    for hook in hooks:
        feats = sorted({f for h, f in features if h == hook})
        sae = saes[hook]
        at_text, at_last = _acts(sae, text, hook, feats), _acts(sae, last, hook, feats)
        au = rank_tests(at_last, y, len(labels))[0]  # [features, emotions], ranks computed once
        for j, f in enumerate(feats):
            card = {"hook": hook, "layer": HookPoint.parse(hook).layer, "feature": f, "n_examples": len(examples),
                    **_activations(task, examples, tok, ex, at_text[:, j], at_last[:, j]),
                    **_logits(task, W_U @ sae.W_dec[f].detach().float().to(W_U.device)),
                    "selectivity": {lab: {"auroc": float(au[j, e]),
                                          "mean": float(at_last[y == e, j].mean()) if (y == e).any() else None}
                                    for e, lab in enumerate(labels)}}
            cards[card_key(hook, f)] = card
    return cards


def _acts(sae, store: Store, hook: str, feats: list[int]) -> np.ndarray:
    """The features' activations at every row of the store (the whole code computed: TopK needs it)."""
    dev, out = sae.W_dec.device, []
    with torch.no_grad():
        for b in store.batches([hook], 4096):
            out.append(sae.encode(b[hook].float().to(dev))[:, feats].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(feats)), np.float32)


def _activations(task, examples, tok: np.ndarray, ex: np.ndarray, a: np.ndarray, at_last: np.ndarray) -> dict:
    """Top examples by their largest text-token activation and by their answer-position activation (every
    text token's value kept for each), the histogram of nonzero text-token activations and the share of
    text tokens the feature fires on."""
    best = np.full(len(examples), -np.inf)
    np.maximum.at(best, ex, a)
    decode = task.model.tokenizer.decode

    def shown(i: int) -> dict:
        vals = a[ex == i]
        return {"id": examples[i].id, "gold": examples[i].label, "tokens": [decode([int(t)]) for t in tok[ex == i]],
                "values": [round(float(v), 4) for v in vals], "max": float(vals.max()) if len(vals) else 0.0,
                "max_index": int(vals.argmax()) if len(vals) else -1, "answer": float(at_last[i])}

    nz = a[a > 0]
    heights, edges = np.histogram(nz, BINS) if len(nz) else (np.zeros(0), np.zeros(1))
    return {"top_examples": [shown(int(i)) for i in np.argsort(-best, kind="stable")[:N_EXAMPLES] if best[i] > 0],
            "answer_examples": [shown(int(i)) for i in np.argsort(-at_last, kind="stable")[:N_EXAMPLES]
                                if at_last[i] > 0],
            "frac_nonzero": float((a > 0).mean()) if len(a) else 0.0, "n_tokens": int(len(a)),
            "act_hist": {"centers": ((edges[1:] + edges[:-1]) / 2).tolist(), "heights": heights.astype(int).tolist()}}


def _logits(task, w: torch.Tensor) -> dict:
    """The tokens a feature's decoder direction promotes and suppresses most, and the weights' histogram."""
    decode = task.model.tokenizer.decode
    pos, neg = w.topk(N_LOGITS), (-w).topk(N_LOGITS)
    heights, edges = np.histogram(w.cpu().numpy(), BINS)
    return {"promoted": [[decode([int(t)]), float(v)] for v, t in zip(pos.values, pos.indices)],
            "suppressed": [[decode([int(t)]), float(-v)] for v, t in zip(neg.values, neg.indices)],
            "logit_hist": {"centers": ((edges[1:] + edges[:-1]) / 2).tolist(), "heights": heights.tolist()}}


def neuronpedia_batch(cards: list[dict], model_id: str, layer: int, sae_set: str, dataset: str = "") -> dict:
    """One SAE's cards as an SAEDashboard Neuronpedia batch (the JSON its runner writes and Neuronpedia
    imports). The top examples form one 'top activations' bin (bin_min -1, bin_max the largest value)."""
    feats = []
    for c in sorted(cards, key=lambda c: c["feature"]):
        top = max((e["max"] for e in c["top_examples"]), default=0.0)
        feats.append({
            "feature_index": c["feature"], "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [], "correlated_neurons_indices": [], "correlated_neurons_l1": [],
            "correlated_neurons_pearson": [], "correlated_features_indices": [], "correlated_features_l1": [],
            "correlated_features_pearson": [],
            "neg_str": [t for t, _ in c["suppressed"]], "neg_values": [round(v, 3) for _, v in c["suppressed"]],
            "pos_str": [t for t, _ in c["promoted"]], "pos_values": [round(v, 3) for _, v in c["promoted"]],
            "frac_nonzero": c["frac_nonzero"],
            "freq_hist_data_bar_values": [round(v, 3) for v in c["act_hist"]["centers"]],
            "freq_hist_data_bar_heights": c["act_hist"]["heights"],
            "logits_hist_data_bar_heights": c["logit_hist"]["heights"],
            "logits_hist_data_bar_values": [round(v, 3) for v in c["logit_hist"]["centers"]],
            "n_prompts_total": c["n_examples"], "n_tokens_in_prompt": 0, "dataset": dataset,
            "decoder_weights_dist": [],
            "activations": [{"bin_min": -1, "bin_max": top, "bin_contains": -1, "tokens": e["tokens"],
                             "values": e["values"]} for e in c["top_examples"]]})
    return {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": feats}
