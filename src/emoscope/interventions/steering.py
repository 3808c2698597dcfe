"""A steering saved as a file, and label probabilities with a steering applied.

A steering file holds its edits with the model name, the SAE hooks and a hash of each SAE's decoder
rows used, so it cannot be applied to another model or SAE by mistake. Format 2 (`format: 2`) keys every edit by its
hook name; a file of format 1 (no `format`, edits keyed by `layer`: the residual stream after that block) is read
as the same edits at blocks.L.hook_resid_post.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import distributed as dist
from ..errors import EmoscopeError
from ..task.calibrate import CONTENT_FREE, apply_prior, prior_from_scores
from .answers import BATCH, answer_batches
from .edits import Edit, apply_edits, sae_at

FORMAT = 2
"""Version of the steering file format (format 1: edits keyed by layer, before hook names)."""


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)
    format: int = FORMAT
    """Version of the file format: 2 since hook names (format-1 files have none; their edits are read by layer as
    resid_post hooks, the same steering); a newer one is refused."""
    model_name: str = ...
    """Model the steering was chosen for."""
    sae_fingerprints: dict[str, str] = Field(default_factory=dict)
    """hook -> hash of the SAE decoder rows used."""
    edits: list[Edit] = Field(default_factory=list)
    chosen_on: dict = Field(default_factory=dict)
    """Provenance: dataset, split, examples, seed, strength search."""

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if not 1 <= v <= FORMAT:
            raise ValueError(f"format {v} is not one this emoscope reads (1..{FORMAT}): update emoscope")
        return v


def fingerprint(sae, features: list[int]) -> str:
    rows = sae.W_dec.detach().float().cpu()[sorted(set(features))].contiguous().numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def make_steering(view, saes: dict, edits: list[Edit], chosen_on: dict | None = None) -> Steering:
    by_hook: dict[str, list[int]] = {}
    for e in edits:
        by_hook.setdefault(e.hook, []).append(e.feature)
    fps = {hook: fingerprint(sae_at(saes, hook), fs) for hook, fs in by_hook.items()}
    return Steering(model_name=view.name, sae_fingerprints=fps, edits=edits, chosen_on=chosen_on or {})


def check(steering: Steering, view, saes: dict) -> None:
    """Refuse a steering made for another model or other SAEs."""
    if steering.model_name != view.name:
        raise EmoscopeError(f"steering was made for model '{steering.model_name}', not '{view.name}'")
    by_hook: dict[str, list[int]] = {}
    for e in steering.edits:
        sae = sae_at(saes, e.hook)
        if not 0 <= e.feature < sae.cfg.d_sae:
            raise EmoscopeError(f"steering edits feature {e.feature} at {e.hook}, beyond its SAE's {sae.cfg.d_sae}")
        by_hook.setdefault(e.hook, []).append(e.feature)
    for hook, fs in by_hook.items():
        if steering.sae_fingerprints.get(hook) != fingerprint(sae_at(saes, hook), fs):
            raise EmoscopeError(f"steering was made with another SAE at {hook} (decoder rows differ)")


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
        return Steering.model_validate_json(p.read_bytes())
    except ValidationError as e:  # bad JSON or bad values: the first problem, where it is
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise EmoscopeError(f"invalid steering file {p}: {where + ': ' if where else ''}{err['msg']}") from None


def label_probs(task, texts: list[str], saes: dict | None = None, edits: list[Edit] = (),
                batch_size: int = BATCH, answers: list | None = None, steer_prior: bool = True,
                prior_answers: list | None = None) -> np.ndarray:
    """Calibrated label probabilities [n, K] from the labels' first tokens at the answer position,
    with the edits applied there (and, with `steer_prior`, to the content-free inputs that set the
    prior: a deployed steering is calibrated as it runs; an `add` push then largely cancels out, so
    pushing toward an emotion is measured against the unsteered prior). `answers`: answer_batches()
    of the texts' prompts, built once when the same texts are steered repeatedly; `prior_answers` those of
    the content-free prompts (calibration.CONTENT_FREE)."""
    view, tokens = task.model, task.label_tokens

    def one(b, edits):
        with torch.no_grad(), apply_edits(view, saes or {}, list(edits), b.last):
            logits, _ = b.logits(view, tokens)
        return torch.log_softmax(logits, -1).double().cpu().numpy()

    def logp(ts, batches=None, edits=edits):
        batches = batches or answer_batches(view, task.encode_all(ts), batch_size)
        return np.concatenate(dist.gather(lambda: [one(b, edits) for b in batches]))

    prior = prior_from_scores(logp(CONTENT_FREE, prior_answers, edits=edits if steer_prior else []))
    return np.exp(apply_prior(logp(list(texts), answers), prior))
