"""Feature steering at the answer position, and its saved, reusable form.

A steering is a list of (layer, feature, mode, value): `scale` multiplies the feature's activation
(amplifying whatever emotion evidence is present — label-agnostic, so it can help recognition at test
time), `add` adds a fixed amount (pushes toward one emotion), `clamp` sets it. It is applied as
decode(steered) - decode(original) = sum (f' - f) W_dec[f] added to the residual, so the SAE's
reconstruction error never leaks in, and a steering of strength zero (scale 1, add 0) changes
nothing, bit for bit. Saved as JSON with the model name, the SAE hooks and a hash of each SAE's
decoder rows, so a steering file cannot be applied to another model or SAE by mistake.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..capture import HookPoint, hook_module
from ..errors import EmoscopeError


class Edit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int
    feature: int
    mode: Literal["scale", "add", "clamp"] = "scale"
    value: float

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("steering strengths must be finite numbers")
        return v


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_name: str = Field(..., description="Model the steering was chosen for.")
    sae_fingerprints: dict[str, str] = Field(default_factory=dict, description="hook -> hash of the SAE decoder rows used.")
    edits: list[Edit] = Field(default_factory=list)
    chosen_on: dict = Field(default_factory=dict, description="Provenance: dataset, split, examples, seed, strength search.")


def fingerprint(sae, features: list[int]) -> str:
    rows = sae.W_dec.detach().float().cpu()[sorted(set(features))].contiguous().numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def make_steering(view, saes: dict, edits: list[Edit], chosen_on: dict | None = None) -> Steering:
    by_layer: dict[int, list[int]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e.feature)
    fps = {f"blocks.{l}.hook_resid_post": fingerprint(saes[l], fs) for l, fs in by_layer.items()}
    return Steering(model_name=view.name, sae_fingerprints=fps, edits=edits, chosen_on=chosen_on or {})


def check(steering: Steering, view, saes: dict) -> None:
    """Refuse a steering made for another model or other SAEs."""
    if steering.model_name != view.name:
        raise EmoscopeError(f"steering was made for model '{steering.model_name}', not '{view.name}'")
    by_layer: dict[int, list[int]] = {}
    for e in steering.edits:
        if e.layer not in saes:
            raise EmoscopeError(f"steering edits layer {e.layer}, which has no SAE here")
        if not 0 <= e.feature < saes[e.layer].cfg.d_sae:
            raise EmoscopeError(f"steering edits feature {e.feature} of layer {e.layer}, beyond its SAE's {saes[e.layer].cfg.d_sae}")
        by_layer.setdefault(e.layer, []).append(e.feature)
    for l, fs in by_layer.items():
        if steering.sae_fingerprints.get(f"blocks.{l}.hook_resid_post") != fingerprint(saes[l], fs):
            raise EmoscopeError(f"steering was made with another SAE at layer {l} (decoder rows differ)")


def save_steering(steering: Steering, path: str | Path) -> None:
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(steering.model_dump_json(indent=2))
    tmp.replace(p)


def load_steering(path: str | Path) -> Steering:
    p = Path(path)
    if not p.is_file():
        raise EmoscopeError(f"steering file not found: {p}")
    try:
        return Steering.model_validate_json(p.read_text())
    except Exception as e:  # pydantic's ValidationError or bad JSON, in one line
        first = str(e).splitlines()
        raise EmoscopeError(f"invalid steering file {p}: {first[-1].strip() if first else e}") from None


@contextmanager
def steer(view, saes: dict, edits: list[Edit], positions: torch.Tensor | None = None):
    """Apply the edits during forwards at positions[b] of each row (the answer position), or at every
    position when `positions` is None."""
    by_layer: dict[int, list[Edit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    handles = []
    for layer, es in by_layer.items():
        sae = saes[layer]
        idx = torch.tensor([e.feature for e in es])
        val = torch.tensor([e.value for e in es])
        mode = [e.mode for e in es]

        def hook(mod, inp, out, sae=sae, idx=idx, val=val, mode=mode):
            t = out[0] if isinstance(out, tuple) else out
            x = t if positions is None else t[torch.arange(len(t), device=t.device), positions]
            f = sae.encode(x.float())[..., idx]
            new = f.clone()
            for j, m in enumerate(mode):
                new[..., j] = f[..., j] * val[j] if m == "scale" else f[..., j] + val[j] if m == "add" else val[j]
            delta = ((new - f) @ sae.W_dec[idx]).to(t.dtype)
            if not torch.isfinite(delta).all():
                raise EmoscopeError("steering produced non-finite activations: lower the strengths")
            t = t.clone()
            if positions is None:
                t = t + delta
            else:
                t[torch.arange(len(t), device=t.device), positions] += delta
            return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
        handles.append(hook_module(view, HookPoint(layer)).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def label_probs(view, task, texts: list[str], saes: dict | None = None, edits: list[Edit] = (),
                batch_size: int = 16, answers: list | None = None, steer_prior: bool = True) -> np.ndarray:
    """Calibrated label probabilities [n, K] from the labels' first tokens at the answer position,
    with the edits applied there (and, with `steer_prior`, to the content-free inputs that set the
    prior: a deployed steering is calibrated as it runs; an `add` push then largely cancels out, so
    pushing toward an emotion is measured against the unsteered prior). `answers`: answer_batches()
    of the texts' prompts, built once when the same texts are steered repeatedly."""
    from ..calibrate import CONTENT_FREE, apply_prior, prior_from_scores
    from .causal import answer_batches

    tokens = [ids[0] for ids in task.builder.label_ids()]

    def logp(ts, batches=None, edits=edits):
        out = []
        batches = batches or answer_batches(view, [task.builder.encode(task.builder.prompt(t)) for t in ts], batch_size)
        for b in batches:
            with torch.no_grad(), steer(view, saes or {}, list(edits), b.last):
                logits, _ = b.logits(view, tokens)
            out.append(torch.log_softmax(logits, -1).double().cpu().numpy())
        return np.concatenate(out)

    prior = prior_from_scores(logp(CONTENT_FREE, edits=edits if steer_prior else []))
    return np.exp(apply_prior(logp(list(texts), answers), prior))
