"""Stage `saes`: one SAE per requested hook — trained from one activation stream, or pretrained
(SAELens format or release) — evaluated on held-out text: L0, FVU, CE-loss recovered, dead latents.

`train_saes(model, ...)` returns an `SAEsResult`: the SAEs (one SAELens folder per hook when saved),
training stats and the per-layer quality table (`result.json`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .. import distributed as dist
from .. import profiling
from ..backends.base import require
from ..artifacts import config_hash, read_json, write_json
from ..constraints import Device
from ..hooks import HookPoint, residual_by_layer
from ..models import resolve_device
from ..sae import io
from ..sae.model import SAE
from ..sae.pretrained import load_saes
from ..sae.quality import evaluate_saes, heldout_batches
from ..sae.train import SAETrainConfig, train_layers
from ..sae.train import layer_groups
from .base import Stage, StageResult

if TYPE_CHECKING:
    from ..backends.transformers import ModelView

# Overlays on the training defaults (which are the quick profile: all 18 Gemma-3-270M layers in
# 3.5-4.5 minutes on the 2-core CPU).
PROFILES = {"quick": {}, "full": {"tokens": 1_000_000, "buffer_tokens": 65536}}


class SAEStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    train: SAETrainConfig = SAETrainConfig()
    """Training settings (see SAETrainConfig)."""
    pretrained: str | None = None
    """Folder of SAELens-format SAE folders (one per hook), or a SAELens release id (online), to load instead of
    training."""
    pretrained_ids: dict[str, str] | str = {}
    """With a SAELens release: an sae_id template filled in for every layer (layer_{layer}/width_16k/canonical),
    `all` (every hook the release has one SAE for), or a mapping hook name -> sae_id."""
    device: Device | None = Field(None, exclude=True)
    """Where the SAEs live (cpu, cuda, cuda:N, auto); unset: the model's device. Every later stage uses them there.
    Placement only: not part of the stage's hash or saved config."""
    eval_seqs: int = Field(48, ge=1)
    """Held-out sequences for evaluation."""
    eval_context: int = Field(128, ge=8)
    """Longest held-out sequence, in tokens."""
    ce: bool = True
    """Compute CE-loss recovered (two extra forwards per layer)."""
    ce_positions: int | None = Field(None, ge=1, exclude_if=lambda v: v is None)
    """Next-token positions per held-out batch at which the CE losses are taken: a seeded sample, the same for
    the clean, spliced and zero-ablated passes (the unembedding of a large vocabulary is most of a pass's cost);
    unset: every position."""


class SAEsResult(StageResult):
    """SAEs by hook (`saes`, `by_layer()`) and their held-out quality (`to_frame()`)."""

    stage = "saes"

    def __init__(self, data: dict, tables=None, timing=None, saes: dict[str, SAE] | None = None):
        super().__init__(data, tables, timing)
        self.saes = saes or {}

    def by_layer(self) -> dict[int, SAE]:
        """The SAEs keyed by layer, for reading and editing the residual stream (resid_post SAEs only)."""
        return residual_by_layer(self.saes, "reading the SAEs by layer")

    def to_frame(self) -> pd.DataFrame:
        """Per hook: depth, L0, FVU, cosine, CE-loss recovered, dead and dense latents."""
        return pd.DataFrame([{"hook": h, "depth": self.data["depth"][h], **q} for h, q in self.data["quality"].items()])

    def _write(self, folder: Path) -> None:
        for name, sae in self.saes.items():
            io.save(sae, folder / name)
        super()._write(folder)

    @classmethod
    def load(cls, folder: str | Path, model: ModelView | None = None, device: str | None = None) -> "SAEsResult":
        """The result and its SAEs, placed on `device` (default: the model's device, else the CPU)."""
        res = super().load(folder)
        if model is not None and res.data["model"] != model.name:
            from ..errors import EmoscopeError
            raise EmoscopeError(f"{folder} holds SAEs for {res.data['model']}, not {model.name}")
        res.saes = load_saes(folder, model, hooks=res.data["hooks"], device=device)
        return res


def train_saes(model: ModelView, config: SAEStageConfig | dict | None = None, data_dir=None, progress=None,
               profile: str | None = None, **train) -> SAEsResult:
    """Train (or, with `pretrained=`, load) an SAE for every requested layer, then evaluate them.
    `profile` (quick, full) and `train` keys (layers, tokens, k, expansion, ...) override the config."""
    from ..errors import validated

    base = _fields(config) if isinstance(config, BaseModel) else dict(config or {})
    overlay = {**PROFILES[profile], **train} if profile else train
    stage_keys = {k: overlay.pop(k) for k in list(overlay) if k in SAEStageConfig.model_fields and k != "train"}
    train_base = base.get("train") or {}
    train_base = _fields(train_base) if isinstance(train_base, BaseModel) else dict(train_base)
    cfg = validated(SAEStageConfig, {**base, **stage_keys, "train": {**train_base, **overlay}})
    return compute(model, cfg, data_dir, progress)


def _fields(cfg: BaseModel) -> dict:
    """Every field's value, placement-only ones too (model_dump leaves out fields marked exclude)."""
    return {k: getattr(cfg, k) for k in type(cfg).model_fields}


def compute(model: ModelView, cfg: SAEStageConfig, data_dir=None, progress=None,
            checkpoint_dir: Path | None = None) -> SAEsResult:
    """Train or load, then evaluate. With `checkpoint_dir`, training checkpoints and the trained SAEs are
    kept there before evaluation, so a killed stage resumes (training) or skips training (evaluation)."""
    require(model, "saes")
    t0 = time.time()
    layers = cfg.train.layers if cfg.train.layers is not None else list(range(model.n_layers))
    hooks = [HookPoint(model.check_layer(layer), cfg.train.kind) for layer in layers]
    device = resolve_device(cfg.device) if cfg.device else model.device
    if cfg.pretrained:
        ids = cfg.pretrained_ids or None
        saes = load_saes(cfg.pretrained, model, hooks=[h.name for h in hooks], ids=ids, device=str(device))
        train_stats = {"pretrained": cfg.pretrained}
    else:
        saes, train_stats = _trained(model, cfg, data_dir, progress, device, checkpoint_dir)
    t_train = time.time() - t0
    batches = heldout_batches(model, cfg.eval_seqs, cfg.eval_context, cfg.train.seed, data_dir=data_dir)
    with profiling.section("llm_forward:sae_quality"):  # the held-out forwards: clean, spliced, zero-ablated
        quality = evaluate_saes(model, saes, batches, ce=cfg.ce, ce_positions=cfg.ce_positions, seed=cfg.train.seed)
    for name, st in train_stats.get("layers", {}).items():
        # dead = unfired over the last `dead_tokens` training tokens (the usual definition); the
        # held-out `dead_frac` counts latents unseen on a few thousand tokens, which overstates it
        quality[name]["dead_frac_train"] = st["dead_frac_train"]
    t_eval = time.time() - t0 - t_train
    data = {
        "stage": "saes", "config_hash": config_hash(cfg, model.name), "config": cfg.model_dump(mode="json"),
        "model": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
        "hooks": [h.name for h in hooks],
        "depth": {h.name: (h.layer + 1) / model.n_layers for h in hooks},
        "train": {k: v for k, v in train_stats.items() if k not in ("seconds", "forward_seconds", "tokens_per_second")},
        "quality": quality,
    }
    public = {h: s.cfg.extra["neuronpedia_id"] for h, s in saes.items() if s.cfg.extra.get("neuronpedia_id")}
    if public:  # the release's public dashboards, linked from the report's feature cards
        data["neuronpedia"] = public
    timing = {"train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1),
              **{k: train_stats[k] for k in ("seconds", "forward_seconds", "tokens_per_second") if k in train_stats}}
    return SAEsResult(data, timing=timing, saes=saes)


def _trained(model: ModelView, cfg: SAEStageConfig, data_dir, progress, device, checkpoint_dir: Path | None):
    """Train (resuming from checkpoints), and keep the result in `checkpoint_dir/trained` before anything
    else runs; the SAEs already there when they come from this same training."""
    if checkpoint_dir is None:
        return train_layers(model, cfg.train, data_dir, progress, device=device)
    done, key = checkpoint_dir / "trained", config_hash(cfg.train, model.name, str(data_dir))
    marker = done / "stats.json"
    if marker.is_file() and read_json(marker).get("key") == key:
        stats = read_json(marker)["stats"]
        return {h: io.load(done / h, str(device)) for h in stats["layers"]}, stats
    saes, stats = train_layers(model, cfg.train, data_dir, progress, device=device, checkpoint_dir=checkpoint_dir)
    if dist.is_main():  # every rank holds the same SAEs
        for h, sae in saes.items():
            io.save(sae, done / h)
        write_json(marker, {"key": key, "stats": stats})  # written last: the folder is complete
    return saes, stats


CHECKPOINTS = ".saes.checkpoint"
"""Folder in a run directory holding SAE training checkpoints and trained SAEs awaiting evaluation, so a killed saes
stage resumes."""


def _run(ctx, cfg: SAEStageConfig, progress, workdir) -> SAEsResult:
    return compute(ctx.model, cfg, ctx.data_dir, progress, checkpoint_dir=ctx.run_dir / CHECKPOINTS)


def _total(ctx, cfg: SAEStageConfig) -> int | None:
    """Tokens times layer groups when training (each group reads the corpus once); unknown when loading."""
    if cfg.pretrained:
        return None
    layers = cfg.train.layers if cfg.train.layers is not None else list(range(ctx.model.n_layers))
    device = resolve_device(cfg.device) if cfg.device else ctx.model.device
    return cfg.train.tokens * len(layer_groups(layers, ctx.model.d_model, cfg.train, device))


STAGE = Stage("saes", SAEStageConfig, SAEsResult, upstream=(), needs=(), run=_run, printer="print_saes",
              summary="Train (or load) an SAE per layer and evaluate them.", total=_total)
