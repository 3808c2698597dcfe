"""SAE quality per layer on held-out text: L0, FVU, cosine similarity, CE-loss recovered, delta LM
loss, dead and dense latent fractions.

CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_sae splices the SAE's
reconstruction into the forward pass at that hook and CE_zero zero-ablates the hook. Splicing and
ablation leave the first position (BOS) untouched, and the loss is over next-token predictions from
position 1 on, the positions the SAEs were trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hooks import HookPoint, edit_output, pad_batch, record, resid
from ..models import ModelView
from .model import SAE


def splice(view: ModelView, hp: HookPoint, fn):
    """Context manager: replace the hook's activation by fn(activation) at positions >= 1 during forwards."""
    def edit(t):
        new = t.clone()
        new[:, 1:] = fn(t[:, 1:]).to(t.device, t.dtype)
        return new
    return edit_output(view, hp, edit)


def lm_loss(view: ModelView, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Summed next-token cross-entropy and token count, from position 1 on; the unembedding is applied
    in chunks of positions so a 262k-token vocabulary never needs a full [batch, seq, vocab] tensor."""
    with record(view, [HookPoint(view.n_layers - 1)]) as acts:
        view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    h = acts[resid(view.n_layers - 1)][:, 1:-1].reshape(-1, view.d_model)
    tgt = ids[:, 2:].reshape(-1)
    valid = (mask[:, 2:] > 0).reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(h), chunk):
        logits = view.logits_from_resid(h[i:i + chunk]).float()
        ce = F.cross_entropy(logits, tgt[i:i + chunk], reduction="none")
        total += (ce * valid[i:i + chunk]).sum().double()
    return torch.stack([total, valid.sum().double().cpu()])


@torch.no_grad()
def evaluate_saes(view: ModelView, saes: dict[str, SAE], batches: list[tuple[torch.Tensor, torch.Tensor]],
                  ce: bool = True, dense_threshold: float = 0.1) -> dict[str, dict]:
    """Per-hook quality metrics on the given held-out (ids, mask) batches."""
    hooks = [HookPoint.parse(n) for n in saes]
    sums = {n: {"sq_err": 0.0, "sq_tot": 0.0, "cos": 0.0, "l0": 0.0, "n": 0, "sum_x": 0.0, "sum_x2": 0.0} for n in saes}
    fires = {n: torch.zeros(s.cfg.d_sae, dtype=torch.long, device=s.W_dec.device) for n, s in saes.items()}
    clean = torch.zeros(2, dtype=torch.float64)
    for ids, mask in batches:
        keep = mask.bool().clone()
        keep[:, 0] = False
        with record(view, hooks) as acts:
            view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        for n, sae in saes.items():
            x = acts[n][keep].to(sae.W_dec.device, torch.float32)
            out = sae(x)
            s = sums[n]
            s["sq_err"] += float((out.recon - x).pow(2).sum())
            s["sum_x"] = s["sum_x"] + x.sum(0).double()
            s["sum_x2"] += float(x.double().pow(2).sum())
            s["cos"] += float(F.cosine_similarity(out.recon, x, dim=-1).sum())
            active = out.feats > 0
            s["l0"] += float(active.sum())
            s["n"] += len(x)
            fires[n] += active.sum(0)
        if ce:
            clean += lm_loss(view, ids, mask)
    result = {}
    ce_clean = float(clean[0] / clean[1]) if ce else None
    for n, sae in saes.items():
        s = sums[n]
        # total variance around the mean: sum ||x||^2 - ||sum x||^2 / n
        sq_tot = s["sum_x2"] - float((s["sum_x"] ** 2).sum()) / s["n"]
        frac = fires[n].double() / s["n"]
        r = {"n_tokens": s["n"], "l0": s["l0"] / s["n"], "fvu": s["sq_err"] / sq_tot, "cosine": s["cos"] / s["n"],
             "dead_frac": float((fires[n] == 0).double().mean()),
             "dense_frac": float((frac > dense_threshold).double().mean())}
        if ce:
            hp = HookPoint.parse(n)
            spliced = zero = torch.zeros(2, dtype=torch.float64)
            for ids, mask in batches:
                with splice(view, hp, lambda t: sae(t.float()).recon):
                    spliced = spliced + lm_loss(view, ids, mask)
                with splice(view, hp, torch.zeros_like):
                    zero = zero + lm_loss(view, ids, mask)
            ce_sae, ce_zero = float(spliced[0] / spliced[1]), float(zero[0] / zero[1])
            r.update(ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, delta_lm_loss=ce_sae - ce_clean,
                     ce_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"))
        result[n] = r
    return result


def heldout_batches(view: ModelView, n_seqs: int, context: int, seed: int, seqs_per_forward: int = 8, data_dir=None):
    """Held-out (ids, mask) batches: WikiText-2 test, dev-split emotion texts and prompts."""
    from .corpus import sequences

    stream = sequences(view, "eval", context, seed + 99991, data_dir=data_dir)
    seqs = sorted((next(stream) for _ in range(n_seqs)), key=len)
    return [pad_batch(seqs[i:i + seqs_per_forward], view.device) for i in range(0, n_seqs, seqs_per_forward)]
