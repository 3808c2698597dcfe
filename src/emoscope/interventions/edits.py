"""SAE feature edits at the answer position (or at every position).

An edit is (hook, feature, mode, value), the hook a TransformerLens name (`blocks.L.hook_resid_post`,
`blocks.L.hook_mlp_out`, `blocks.L.hook_attn_out`: the edit applies where the SAE reads, so an mlp_out SAE edits the
MLP's output, never the residual stream; `layer=L` is shorthand for resid_post). `scale` multiplies the feature's
activation (amplifying whatever emotion evidence is present — label-agnostic, so it can help recognition at test time),
`add` adds a fixed amount (pushes toward one emotion), `clamp` sets it (an ablation is a clamp to zero
or to a baseline). It is applied as decode(edited) - decode(original) = sum (f' - f) W_dec[f] added to
the residual, so the SAE's reconstruction error never leaks in, and an edit of strength zero (scale 1,
add 0) changes nothing, bit for bit. Features are read from the residual as it is at that point, so
edits at several layers compose.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..errors import EmoscopeError
from ..hooks import HOOK_NAME, HookPoint, at, hook_module, resid


class Edit(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    hook: str
    """Where the edit applies and its SAE reads: a TransformerLens hook name (`layer=L` given instead: resid_post)."""
    feature: int
    """The SAE feature edited."""
    mode: Literal["scale", "add", "clamp"] = "scale"
    """scale multiplies the feature's activation by `value`, add adds `value`, clamp sets it to `value`."""
    value: float
    """The factor, amount or value."""

    @model_validator(mode="before")
    @classmethod
    def _layer_shorthand(cls, data):
        """`layer: L` (steering files of format 1, and the stages) is the residual stream after block L."""
        if isinstance(data, dict) and "layer" in data and "hook" not in data:
            data = {k: v for k, v in data.items() if k != "layer"} | {"hook": resid(int(data["layer"]))}
        return data

    @field_validator("hook")
    @classmethod
    def _known_hook(cls, v: str) -> str:
        try:
            return HookPoint.parse(v).name
        except EmoscopeError as e:
            raise ValueError(str(e)) from None

    @property
    def layer(self) -> int:
        """The block the hook belongs to."""
        return HookPoint.parse(self.hook).layer

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("steering strengths must be finite numbers")
        return v


@contextmanager
def apply_edits(view, saes: dict, edits: list[Edit], positions: torch.Tensor | None = None):
    """Apply the edits during forwards at positions[b] of each row (the answer position), or at every
    position when `positions` is None."""
    by_hook: dict[str, list[Edit]] = {}
    for e in edits:
        by_hook.setdefault(e.hook, []).append(e)
    hooks = {}
    for name, es in by_hook.items():
        sae = sae_at(saes, name)
        idx = torch.tensor([e.feature for e in es], device=sae.W_dec.device)
        val = torch.tensor([e.value for e in es], device=sae.W_dec.device)
        mode = [e.mode for e in es]

        def hook(mod, inp, out, sae=sae, idx=idx, val=val, mode=mode):
            t = out[0] if isinstance(out, tuple) else out
            x = t if positions is None else t[at(t, positions)]
            x = x.to(sae.W_dec.device, torch.float32)
            f = sae.encode(x)[..., idx]
            new = f.clone()
            for j, m in enumerate(mode):
                new[..., j] = f[..., j] * val[j] if m == "scale" else f[..., j] + val[j] if m == "add" else val[j]
            delta = (((new - f) @ sae.W_dec[idx]) * sae.out_scale(x)).to(t.device, t.dtype)
            if not torch.isfinite(delta).all():
                raise EmoscopeError("steering produced non-finite activations: lower the strengths")
            t = t.clone()
            if positions is None:
                t = t + delta
            else:
                t[at(t, positions)] += delta
            return _replaced(out, t)
        hooks[name] = hook
    with _forward_hooks(view, hooks):
        yield


def sae_at(saes: dict, hook: str):
    """The SAE that reads `hook`: keyed by its hook name, or by its layer for the residual stream (the stages' SAEs).
    An SAE trained on another hook than the one an edit names is refused in one line."""
    hp = HookPoint.parse(hook)
    sae = saes.get(hook, saes.get(hp.layer) if hp.kind == "resid_post" else None)
    if sae is None:
        raise EmoscopeError(f"no SAE reads {hook} here (SAEs at: {', '.join(map(str, saes)) or 'none'})")
    trained_on = getattr(sae.cfg, "hook_name", "") or ""
    if HOOK_NAME.fullmatch(trained_on) and trained_on != hp.name:
        raise EmoscopeError(f"an edit at {hook} would use the SAE trained on {trained_on}: edit it at its own hook")
    return sae


def set_features(view, saes: dict, features: dict[int, list[int]], positions: torch.Tensor,
                 baseline: dict[int, torch.Tensor] | None = None):
    """Context manager: at positions[b] of each row and after each listed block, set the listed SAE
    features to the baseline (zero when none), keeping the error term."""
    edits = [Edit(layer=layer, feature=int(f), mode="clamp",
                  value=0.0 if baseline is None else float(baseline[layer].reshape(-1)[f]))
             for layer, fs in features.items() for f in fs]
    return apply_edits(view, saes, edits, positions)


@contextmanager
def clamp_sites(view, saes: dict, sites: tuple[torch.Tensor, torch.Tensor], entries: dict[int, tuple[torch.Tensor,
                torch.Tensor]], baseline: dict[int, torch.Tensor] | None = None):
    """Context manager: after each listed block, at the (row, position) pairs `sites`, set feature cols[i] at
    site idx[i] to the baseline (zero when none), keeping the error term, where entries[layer] = (idx,
    cols): every site of one pass may get its own ablation (set_features gives every row the same)."""
    hooks = {}
    for layer, (idx, cols) in entries.items():
        sae = saes[layer]
        idx, cols = idx.to(sae.W_dec.device), cols.to(sae.W_dec.device)
        new = 0.0 if baseline is None else baseline[layer].reshape(-1).to(sae.W_dec.device)[cols]

        def hook(mod, inp, out, sae=sae, idx=idx, cols=cols, new=new):
            t = out[0] if isinstance(out, tuple) else out
            where = tuple(i.to(t.device) for i in sites)
            delta = clamp_delta(sae, t[where].to(sae.W_dec.device, torch.float32), idx, cols, new)
            t = t.clone()
            t[where] += delta.to(t.device, t.dtype)
            return _replaced(out, t)
        hooks[resid(layer)] = hook
    with _forward_hooks(view, hooks):
        yield


def clamp_delta(sae, x: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor, new) -> torch.Tensor:
    """The change [n, d] to residual rows x [n, d] that sets feature cols[i] of row idx[i] to `new` (a number or
    one value per entry), the SAE error term kept."""
    change = (new - sae.encode(x)[idx, cols])[:, None] * sae.W_dec[cols]
    return torch.zeros_like(x).index_add_(0, idx, change) * sae.out_scale(x)


def clamp_rows(saes: dict, sets: list[dict[int, list[int]]], baseline: dict[int, torch.Tensor] | None = None) -> dict:
    """Row edits for a runtime that applies them itself (`backends.llamacpp.LlamaCppModel.answer_logits_each`): per
    layer, a function of residual rows x [n, d] and the set index of each row [n] that returns the change setting
    that set's features of that layer to the baseline (zero when none), the SAE error term kept."""
    def for_layer(layer):
        sae = saes[layer]

        def fn(x, set_of_row):
            pairs = [(i, int(f)) for i, s in enumerate(set_of_row) for f in sets[s].get(layer, [])]
            if not pairs:
                return torch.zeros_like(x)
            idx, cols = (torch.tensor(v, device=sae.W_dec.device) for v in zip(*pairs))
            new = 0.0 if baseline is None else baseline[layer].reshape(-1).to(sae.W_dec.device)[cols]
            return clamp_delta(sae, x.to(sae.W_dec.device, torch.float32), idx, cols, new).cpu()
        return fn
    return {layer: for_layer(layer) for layer in sorted({layer for s in sets for layer in s})}


@contextmanager
def _forward_hooks(view, hooks: dict):
    """Each hook {hook name: fn} registered on its module's output while the context lasts."""
    handles = [hook_module(view, HookPoint.parse(name)).register_forward_hook(fn) for name, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replaced(out, t: torch.Tensor):
    """A block's output with its hidden states replaced by t."""
    return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
