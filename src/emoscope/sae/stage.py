"""Stage `saes`: get one SAE per requested hook (train them, or load pretrained SAELens-format ones),
evaluate them on held-out text, and write `run_dir/saes/`: one SAELens folder per hook plus
`result.json` (training stats, per-layer quality table) and `timing.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..artifacts import config_hash, read_json, stage_dir, write_json
from ..capture import HookPoint
from ..errors import EmoscopeError
from ..models import ModelView
from . import io
from .evaluate import evaluate_saes, heldout_batches
from .train import SAETrainConfig, train_saes

# Measured on the 2-core CPU: quick trains all 18 Gemma-3-270M layers in 3.5-4.5 minutes.
PROFILES = {
    "quick": dict(tokens=120_000, buffer_tokens=16384),
    "full": dict(tokens=1_000_000, buffer_tokens=65536),
}


class SAEStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: SAETrainConfig = Field(SAETrainConfig(**PROFILES["quick"]), description="Training settings (see SAETrainConfig).")
    pretrained: str | None = Field(None, description="Folder of SAELens-format SAE folders (one per hook), or a SAELens release id (online), to load instead of training.")
    pretrained_ids: dict[str, str] = Field({}, description="With a SAELens release: hook name -> sae_id in that release (e.g. layer_12/width_16k/canonical).")
    eval_seqs: int = Field(48, ge=1, description="Held-out sequences for evaluation.")
    eval_context: int = Field(128, ge=8, description="Longest held-out sequence, in tokens.")
    ce: bool = Field(True, description="Compute CE-loss recovered (two extra forwards per layer).")


def _from_release(release: str, ids: dict[str, str], view: ModelView, hooks: list[HookPoint]) -> dict:
    """Download SAELens release SAEs (needs sae_lens and a network), via SAELens's own loader."""
    import tempfile

    try:
        from sae_lens import SAE as LensSAE
    except ImportError:
        raise EmoscopeError(f"'{release}' is not a folder; loading a SAELens release needs `pip install emoscope[interop]`") from None
    missing = [h.name for h in hooks if h.name not in ids]
    if missing:
        raise EmoscopeError(f"release {release}: give pretrained_ids for {', '.join(missing)} (hook -> sae_id)")
    saes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hp in hooks:
            try:
                lens = LensSAE.from_pretrained(release, ids[hp.name], device="cpu")
            except Exception as e:  # offline, unknown release or id
                raise EmoscopeError(f"cannot load SAELens release {release} / {ids[hp.name]}: {str(e).splitlines()[0]}") from None
            lens = lens[0] if isinstance(lens, tuple) else lens
            lens.save_model(Path(tmp) / hp.name)
            sae = io.load(Path(tmp) / hp.name, str(view.device))
            sae.cfg.hook_name = sae.cfg.hook_name or hp.name
            io.check_against(sae, view)
            saes[hp.name] = sae
    return saes


def _load_pretrained(folder: str, view: ModelView, hooks: list[HookPoint], ids: dict[str, str]) -> dict:
    root = Path(folder)
    if not root.is_dir():
        if ids:
            return _from_release(folder, ids, view, hooks)
        raise EmoscopeError(f"pretrained SAE folder not found: {root} (for a SAELens release, also give pretrained_ids)")
    saes = {}
    for hp in hooks:
        sub = root / hp.name
        if not sub.is_dir():
            raise EmoscopeError(f"no SAE for {hp.name} in {root} (expected a folder {sub.name})")
        sae = io.load(sub, str(view.device))
        io.check_against(sae, view, hp.name)
        saes[hp.name] = sae
    return saes


def run_saes(cfg: SAEStageConfig, run_dir: str | Path, view: ModelView, data_dir=None, progress=None, log=lambda s: None,
             key: str | None = None) -> dict:
    """Run the stage; `key` is the hash the orchestrator files the result under (default: config + model)."""
    t0 = time.time()
    layers = cfg.train.layers if cfg.train.layers is not None else list(range(view.n_layers))
    hooks = [HookPoint(view.check_layer(l), cfg.train.kind) for l in layers]
    if cfg.pretrained:
        saes, train_stats = _load_pretrained(cfg.pretrained, view, hooks, cfg.pretrained_ids), {"pretrained": cfg.pretrained}
    else:
        saes, train_stats = train_saes(view, cfg.train, data_dir, progress, log)
    t_train = time.time() - t0
    batches = heldout_batches(view, cfg.eval_seqs, cfg.eval_context, cfg.train.seed, data_dir=data_dir)
    quality = evaluate_saes(view, saes, batches, ce=cfg.ce)
    for name, st in train_stats.get("layers", {}).items():
        # dead = unfired over the last `dead_tokens` training tokens (the usual definition); the
        # held-out `dead_frac` counts latents unseen on a few thousand tokens, which overstates it
        quality[name]["dead_frac_train"] = st["dead_frac_train"]
    t_eval = time.time() - t0 - t_train
    result = {
        "stage": "saes", "config_hash": key or config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
        "model": view.name, "n_layers": view.n_layers, "d_model": view.d_model,
        "hooks": [h.name for h in hooks],
        "depth": {h.name: (h.layer + 1) / view.n_layers for h in hooks},
        "train": {k: v for k, v in train_stats.items() if k not in ("seconds", "forward_seconds", "tokens_per_second")},
        "quality": quality,
    }
    timing = {"train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1),
              **{k: train_stats[k] for k in ("seconds", "forward_seconds", "tokens_per_second") if k in train_stats}}
    with stage_dir(run_dir, "saes") as out:
        for name, sae in saes.items():
            io.save(sae, out / name)
        write_json(out / "result.json", result)
        write_json(out / "timing.json", timing)
    return result


def load_saes(run_dir: str | Path, view: ModelView | None = None) -> dict:
    """The SAEs a finished `saes` stage saved, checked against the model when one is given."""
    d = Path(run_dir) / "saes"
    if not (d / "result.json").exists():
        raise EmoscopeError(f"{run_dir} has no saes/result.json: run the saes stage first")
    res = read_json(d / "result.json")
    if view is not None and res["model"] != view.name:
        raise EmoscopeError(f"{run_dir} holds SAEs for {res['model']}, not {view.name}")
    saes = {}
    for name in res["hooks"]:
        sae = io.load(d / name)
        if view is not None:
            io.check_against(sae, view, name)
        saes[name] = sae
    return saes
