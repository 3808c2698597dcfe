"""SAE quality per layer on held-out text: L0, FVU, cosine similarity, CE-loss recovered, delta LM
loss, dead and dense latent fractions.

CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_sae splices the SAE's
reconstruction into the forward pass at that hook and CE_zero zero-ablates the hook. Splicing and
ablation leave the first position (BOS) untouched, and the loss is over next-token predictions from
position 1 on, the positions the SAEs were trained on.
"""

from __future__ import annotations


from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from ..hooks import HookPoint, edit_output, pad_batch, record, resid
from .model import SAE
from ..backends.base import Backend



def splice(view: Backend, hp: HookPoint, fn):
    """Context manager: replace the hook's activation by fn(activation) at positions >= 1 during forwards."""
    def edit(t):
        new = t.clone()
        new[:, 1:] = fn(t[:, 1:]).to(t.device, t.dtype)
        return new
    return edit_output(view, hp, edit)


def lm_loss(view: Backend, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 256,
            positions: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy and token count, from position 1 on (only at `positions`, indices into
    those next-token predictions in row-major order, where given); the unembedding is applied in chunks of
    positions so a 262k-token vocabulary never needs a full [batch, seq, vocab] tensor."""
    with record(view, [HookPoint(view.n_layers - 1)]) as acts:
        view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
    return _ce(view, acts[resid(view.n_layers - 1)], ids, mask, chunk, positions)


def _ce(view: Backend, last: torch.Tensor, ids, mask, chunk: int = 256, positions=None) -> torch.Tensor:
    """lm_loss from the last layer's residual [batch, seq, d]."""
    h = last[:, 1:-1].reshape(-1, view.d_model)
    tgt = ids[:, 2:].reshape(-1)
    valid = (mask[:, 2:] > 0).reshape(-1)
    if positions is not None:
        h, tgt, valid = h[positions.to(h.device)], tgt[positions.to(tgt.device)], valid[positions.to(valid.device)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(h), chunk):
        logits = view.logits_from_resid(h[i:i + chunk]).float()
        ce = F.cross_entropy(logits, tgt[i:i + chunk].to(logits.device), reduction="none")
        total += (ce * valid[i:i + chunk].to(ce.device)).sum().double().cpu()
    return torch.stack([total, valid.sum().double().cpu()])


def ce_sample(mask: torch.Tensor, n: int | None, seed: int) -> torch.Tensor | None:
    """A seeded sample of `n` next-token positions of a batch (sorted indices for lm_loss); None: all of them."""
    valid = torch.nonzero((mask[:, 2:] > 0).reshape(-1).cpu()).squeeze(1)
    if n is None or n >= len(valid):
        return None
    g = torch.Generator().manual_seed(seed)
    return valid[torch.randperm(len(valid), generator=g)[:n]].sort().values


@contextmanager
def block_outputs(view: Backend):
    """Within the block, every forward stores what each decoder block returned, by layer."""
    outs: dict[int, object] = {}
    handles = [b.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out))
               for i, b in enumerate(view.blocks)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay(view: Backend, outs: dict[int, object], upto: int):
    """Within the block, decoder blocks 0..upto-1 return what they returned in a recorded forward over the same
    batch (`block_outputs`) instead of computing it; hooks on them still run. A forward that changes nothing
    before block `upto` gives the same result, bit for bit, without recomputing the blocks before it."""
    saved = []
    try:
        for i in range(upto):
            blk = view.blocks[i]
            saved.append((blk, blk.__dict__.get("forward")))  # an instance forward: accelerate's device hooks
            blk.forward = lambda *a, _out=outs[i], **k: _out
        yield
    finally:
        for blk, own in saved:
            if own is None:
                del blk.forward
            else:
                blk.forward = own


@torch.no_grad()
def evaluate_saes(view: Backend, saes: dict[str, SAE], batches: list[tuple[torch.Tensor, torch.Tensor]],
                  ce: bool = True, dense_threshold: float = 0.1, ce_positions: int | None = None,
                  seed: int = 0, reuse: bool = True) -> dict[str, dict]:
    """Per-hook quality metrics on the given held-out (ids, mask) batches. The CE losses are taken at every
    next-token position, or at a seeded sample of `ce_positions` per batch (the same for the clean, spliced and
    zero-ablated passes). A spliced pass replays the clean pass's blocks before its hook (`reuse`; the same
    numbers as recomputing them, bit for bit, in about half the forward time over all layers)."""
    hooks = [HookPoint.parse(n) for n in saes]
    last = HookPoint(view.n_layers - 1)
    sums = {n: {"sq_err": 0.0, "sq_tot": 0.0, "cos": 0.0, "l0": 0.0, "n": 0, "sum_x": 0.0, "sum_x2": 0.0} for n in saes}
    fires = {n: torch.zeros(s.cfg.d_sae, dtype=torch.long, device=s.W_dec.device) for n, s in saes.items()}
    losses = {n: torch.zeros(2, 2, dtype=torch.float64) for n in saes}  # [spliced, zero] x [sum, count]
    clean = torch.zeros(2, dtype=torch.float64)
    for b, (ids, mask) in enumerate(batches):
        keep = mask.bool().clone()
        keep[:, 0] = False
        # every block's output only where spliced passes will replay it
        with record(view, hooks + [last]) as acts, (block_outputs(view) if ce and reuse else nullcontext()) as outs:
            view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        for n, sae in saes.items():
            _add_reconstruction(sums[n], fires[n], sae, acts[n][keep].to(sae.W_dec.device, torch.float32))
        if ce:
            pos = ce_sample(mask, ce_positions, seed * 7919 + b)
            clean += _ce(view, acts[last.name], ids, mask, positions=pos)
            for n, sae in saes.items():
                losses[n] += _spliced_losses(view, HookPoint.parse(n), sae, outs, ids, mask, pos)
        del acts, outs
    ce_clean = float(clean[0] / clean[1]) if ce else None
    return {n: _metrics(sums[n], fires[n], dense_threshold, ce_clean, losses[n] if ce else None) for n in saes}


def _add_reconstruction(s: dict, fires: torch.Tensor, sae: SAE, x: torch.Tensor) -> None:
    out = sae(x)
    s["sq_err"] += float((out.recon - x).pow(2).sum())
    s["sum_x"] = s["sum_x"] + x.sum(0).double()
    s["sum_x2"] += float(x.double().pow(2).sum())
    s["cos"] += float(F.cosine_similarity(out.recon, x, dim=-1).sum())
    active = out.feats > 0
    s["l0"] += float(active.sum())
    s["n"] += len(x)
    fires += active.sum(0)


def _spliced_losses(view, hp: HookPoint, sae: SAE, outs, ids, mask, pos) -> torch.Tensor:
    """lm_loss with the SAE's reconstruction spliced in at the hook, and with the hook zero-ablated (replaying the
    blocks before the hook from `outs`, where given)."""
    # a block's own output hook runs on a replay, so a residual hook's block is replayed too
    upto = 0 if outs is None else hp.layer + 1 if hp.kind == "resid_post" else hp.layer
    with replay(view, outs or {}, upto):
        with splice(view, hp, lambda t: sae(t.float()).recon):
            spliced = lm_loss(view, ids, mask, positions=pos)
        with splice(view, hp, torch.zeros_like):
            zero = lm_loss(view, ids, mask, positions=pos)
    return torch.stack([spliced, zero])


def _metrics(s: dict, fires: torch.Tensor, dense_threshold: float, ce_clean, losses) -> dict:
    # total variance around the mean: sum ||x||^2 - ||sum x||^2 / n
    sq_tot = s["sum_x2"] - float((s["sum_x"] ** 2).sum()) / s["n"]
    frac = fires.double() / s["n"]
    r = {"n_tokens": s["n"], "l0": s["l0"] / s["n"], "fvu": s["sq_err"] / sq_tot, "cosine": s["cos"] / s["n"],
         "dead_frac": float((fires == 0).double().mean()),
         "dense_frac": float((frac > dense_threshold).double().mean())}
    if losses is not None:
        ce_sae, ce_zero = float(losses[0, 0] / losses[0, 1]), float(losses[1, 0] / losses[1, 1])
        r.update(ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, delta_lm_loss=ce_sae - ce_clean,
                 ce_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"))
    return r


def heldout_batches(view: Backend, n_seqs: int, context: int, seed: int, seqs_per_forward: int = 8, data_dir=None):
    """Held-out (ids, mask) batches: WikiText-2 test, dev-split emotion texts and prompts."""
    from .corpus import sequences

    stream = sequences(view, "eval", context, seed + 99991, data_dir=data_dir)
    seqs = sorted((next(stream) for _ in range(n_seqs)), key=len)
    return [pad_batch(seqs[i:i + seqs_per_forward], view.device) for i in range(0, n_seqs, seqs_per_forward)]
