"""Stage `phases`: read the model layer by layer through its SAEs on the evaluated examples, find the
phases, and the shared vs emotion-specific features (claims 1 and 2).

Writes `run_dir/phases/`: `result.json` (per-layer table for all examples and for correctly
classified ones, phase fits for 1-5 phases, the chosen phases with bootstrap intervals, the share of
emotion-selective features in the last phase, shared/specific counts, emotion overlap, top features
with examples and promoted tokens) and `features.parquet` (layer x feature x emotion selectivity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..artifacts import config_hash, read_json, stage_dir, write_json
from ..capture import HookPoint, capture_to_store, token_positions
from ..data import Example
from ..errors import EmoscopeError
from ..evaluate import EvalConfig, Task
from ..models import ModelView
from ..sae.stage import load_saes
from .layers import layer_row, selectivity, text_scores
from .phases import SEGMENT_STATS, boundary_intervals, fit_phases, name_phases, phase_of
from .stats import linear_cka, probe_accuracy


class PhasesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fdr: float = Field(0.05, gt=0, lt=1, description="False-discovery rate for emotion-selective features (BH over features x emotions).")
    min_auroc: float = Field(0.7, ge=0.5, le=1, description="Smallest one-vs-rest AUROC that counts as selective (effect size).")
    min_per_class: int = Field(10, ge=2, description="Fewest examples per emotion needed to analyse a subset.")
    n_boot: int = Field(100, ge=10, description="Resamples (80% subsamples without replacement) for boundary and share intervals.")
    max_phases: int = Field(5, ge=2, description="Largest number of phases fitted.")
    min_gain: float = Field(0.2, gt=0, lt=1, description="Each added phase must explain this share of the 1-phase residual.")
    probe_folds: int = Field(5, ge=2, description="Cross-validation folds of the linear probes.")
    text_features: int = Field(256, ge=8, description="Most variable features per layer used for the text-token scores.")
    top_features: int = Field(5, ge=1, description="Top features per emotion described with examples and tokens.")
    seed: int = Field(0, description="Seed for bootstrap, probes and label shuffles.")


def _examples(run_dir: Path, view: ModelView) -> tuple[dict, pd.DataFrame]:
    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run the evaluate stage first")
    ev = read_json(f)
    if ev["model"]["name"] != view.name:
        raise EmoscopeError(f"{run_dir} was evaluated with {ev['model']['name']}, not {view.name}")
    return ev, pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")


def _lens(view: ModelView, resid: np.ndarray, first_tokens: list[int], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit lens at the final token, per example: P(gold) renormalised over the labels' first tokens,
    and whether the gold label is the lens's top label."""
    with torch.no_grad():
        lp = torch.log_softmax(view.logits_from_resid(torch.from_numpy(resid).to(view.device, view.dtype)).float(), -1)
    lab = torch.log_softmax(lp[:, first_tokens], -1).cpu().numpy()
    return np.exp(lab[np.arange(len(y)), y]), lab.argmax(1) == y


def _encode(sae, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([sae.encode(torch.from_numpy(x[i:i + batch]).float()).numpy() for i in range(0, len(x), batch)])


def run_phases(cfg: PhasesConfig, run_dir: str | Path, view: ModelView, key: str | None = None, progress=None) -> dict:
    run_dir = Path(run_dir)
    ev, preds = _examples(run_dir, view)
    saes = load_saes(run_dir, view)
    hooks = sorted((HookPoint.parse(h) for h in saes), key=lambda h: h.layer)
    labels = ev["labels"]
    E = len(labels)
    counts = preds.gold.value_counts()
    short = {c: int(counts.get(c, 0)) for c in labels if counts.get(c, 0) < cfg.min_per_class}
    if short:
        raise EmoscopeError(f"too few examples per emotion for the phases analysis (need {cfg.min_per_class}): {short}")
    task = Task(EvalConfig.model_validate(ev["config"]), view)
    examples = [Example(r.id, r.text, (r.gold,)) for r in preds.itertuples()]
    y = np.array([labels.index(g) for g in preds.gold])
    correct = preds.correct_cal.to_numpy()
    first_tokens = [ids[0] for ids in task.builder.label_ids()]
    rng = np.random.default_rng(cfg.seed)
    # Subsamples without replacement, not the bootstrap: duplicated examples would make the rank tests
    # behind selectivity anti-conservative. 80% subsamples give conservative (wider) intervals.
    boots = [np.sort(rng.choice(len(y), int(0.8 * len(y)), replace=False)) for _ in range(cfg.n_boot)]

    with stage_dir(run_dir, "phases") as out:
        last = capture_to_store(view, task.builder, examples, hooks, "last", out / "store_last")
        text = capture_to_store(view, task.builder, examples, hooks, "text", out / "store_text")
        tok_ids = text.read("token_ids").numpy()
        ex_idx = text.read("example_idx").numpy()
        rows = {"all": [], "correct": []}
        boot_S = np.zeros((cfg.n_boot, len(hooks), len(SEGMENT_STATS)))
        sel_all, codes_keep, prev = [], [], None
        for li, hp in enumerate(hooks):
            sae = saes[hp.name]
            resid = last.read(hp.name).float().numpy()
            codes = _encode(sae, resid)
            codes_text = _encode(sae, text.read(hp.name).float().numpy())
            top = np.argsort(-codes_text.var(0))[:cfg.text_features]
            ct = codes_text[:, top]
            p_gold, lens_hit = _lens(view, resid, first_tokens, y)
            for subset, mask in [("all", np.ones(len(y), bool)), ("correct", correct)]:
                if min(np.bincount(y[mask], minlength=E)) < cfg.min_per_class:
                    continue  # reported as missing for this subset
                tmask = mask[ex_idx]
                row, sel = layer_row(hp.layer, codes[mask], ct[tmask], resid[mask], prev[mask] if prev is not None else None,
                                     tok_ids[tmask], ex_idx[tmask], y[mask], E, cfg.fdr, cfg.min_auroc)
                folds = min(cfg.probe_folds, int(np.bincount(y[mask]).min()))
                row.update(depth=(hp.layer + 1) / view.n_layers, hook=hp.name, lens_gold_prob=float(p_gold[mask].mean()),
                           lens_acc=float(lens_hit[mask].mean()),
                           probe_resid=probe_accuracy(resid[mask], y[mask], folds, cfg.seed),
                           probe_resid_shuffled=probe_accuracy(resid[mask], y[mask], folds, cfg.seed, shuffle_labels=True),
                           probe_codes=probe_accuracy(codes[mask], y[mask], folds, cfg.seed),
                           probe_codes_shuffled=probe_accuracy(codes[mask], y[mask], folds, cfg.seed, shuffle_labels=True))
                if subset == "all":
                    sel_all.append(sel)
                rows[subset].append(row)
            # bootstrap: the segmented statistics recomputed on resampled examples
            for b, idx in enumerate(boots):
                s = selectivity(codes[idx], y[idx], E, cfg.fdr, cfg.min_auroc)
                tm = np.isin(ex_idx, idx)
                sf, sm = text_scores(ct[tm], tok_ids[tm], ex_idx[tm])
                boot_S[b, li] = [sf, sm, float((s.n_emotions > 0).mean()), float(p_gold[idx].mean()),
                                 linear_cka(prev[idx], resid[idx]) if prev is not None else np.nan]
            codes_keep.append(codes)
            prev = resid
            if progress:
                progress(1)
        S = np.array([[r[c] for c in SEGMENT_STATS] for r in rows["all"]])
        fit = fit_phases(S, cfg.max_phases, cfg.min_gain)
        k, bnd = fit["n_phases"], fit["boundaries"]
        boot_b = [fit_phases(Sb, k, 1e-9)["fits"][k]["boundaries"] for Sb in boot_S]
        n_sel = np.array([r["n_selective"] for r in rows["all"]])
        ph = phase_of(len(hooks), bnd)
        share = float(n_sel[ph == k - 1].sum() / max(n_sel.sum(), 1))
        boot_share = []
        for Sb, bb in zip(boot_S, boot_b):
            nb = Sb[:, SEGMENT_STATS.index("selective_frac")]
            boot_share.append(float(nb[phase_of(len(hooks), bb) == k - 1].sum() / max(nb.sum(), 1e-12)))
        features = _features(sel_all, hooks, labels, ph, codes_keep, saes, view, preds, task, cfg)
        result = {
            "stage": "phases", "config_hash": key or config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
            "model": view.name, "n_layers": view.n_layers, "labels": labels, "n": int(len(y)), "n_correct": int(correct.sum()),
            "seed": cfg.seed, "hooks": [h.name for h in hooks], "layers": rows,
            "fits": {str(kk): {**v, "boundary_depths": [b_ / len(hooks) for b_ in v["boundaries"]]} for kk, v in fit["fits"].items()},
            "criterion": fit["criterion"], "n_phases": k,
            "boundaries": [{"layer": int(hooks[b_].layer), "depth": hooks[b_].layer / view.n_layers, **ci}
                           for b_, ci in zip(bnd, boundary_intervals(boot_b, len(hooks)))],
            "phase_names": name_phases(S, SEGMENT_STATS, bnd),
            "phase_of_layer": {h.name: int(p) for h, p in zip(hooks, ph)},
            "last_phase_share": {"value": share, "lo": float(np.percentile(boot_share, 2.5)), "hi": float(np.percentile(boot_share, 97.5)),
                                 "n_boot": cfg.n_boot},
            **features,
        }
        rows_f = [{"layer": h.layer, "feature": int(f), "emotion": labels[e], "auroc": float(s.auroc[f, e]), "p_adj": float(s.p_adj[f, e])}
                  for h, s in zip(hooks, sel_all) for f, e in zip(*np.nonzero(s.selective))]
        pd.DataFrame(rows_f, columns=["layer", "feature", "emotion", "auroc", "p_adj"]).to_parquet(out / "features.parquet", index=False)
        write_json(out / "result.json", result)
    return result


def _features(sels, hooks, labels, ph, codes_keep, saes, view, preds, task, cfg) -> dict:
    """Shared vs specific features per emotion and phase, emotion overlap (Jaccard), top features."""
    E = len(labels)
    sets = {e: set() for e in range(E)}
    per_phase = {lab: {} for lab in labels}
    specific = {lab: 0 for lab in labels}
    shared = {lab: 0 for lab in labels}
    for li, (hp, s) in enumerate(zip(hooks, sels)):
        k = s.n_emotions
        for f, e in zip(*np.nonzero(s.selective)):
            sets[e].add((hp.layer, int(f)))
            kind = "specific" if k[f] == 1 else "shared"
            (specific if kind == "specific" else shared)[labels[e]] += 1
            d = per_phase[labels[e]].setdefault(str(int(ph[li])), {"specific": 0, "shared": 0})
            d[kind] += 1
    jac = [[len(sets[a] & sets[b]) / max(len(sets[a] | sets[b]), 1) for b in range(E)] for a in range(E)]
    top = {}
    W_U = view.unembed.weight.detach().float()
    for e, lab in enumerate(labels):
        cands = [(s.auroc[f, e], li, int(f)) for li, s in enumerate(sels) for f in np.flatnonzero(s.selective[:, e])]
        top[lab] = []
        for au, li, f in sorted(cands, reverse=True)[:cfg.top_features]:
            hp = hooks[li]
            acts = codes_keep[li][:, f]
            best = np.argsort(-acts)[:5]
            promoted = (W_U @ saes[hp.name].W_dec[f].detach().float()).topk(8).indices.tolist()
            top[lab].append({
                "hook": hp.name, "layer": hp.layer, "feature": f, "auroc": float(au), "phase": int(ph[li]),
                "emotions": [labels[j] for j in np.flatnonzero(sels[li].selective[f])],
                "top_examples": [{"id": preds.id.iloc[i], "text": preds.text.iloc[i], "gold": preds.gold.iloc[i],
                                  "activation": float(acts[i]), "token": _top_token(view, task, saes[hp.name], hp, f, preds.text.iloc[i])}
                                 for i in best if acts[i] > 0],
                "promoted_tokens": [view.tokenizer.decode([t]) for t in promoted],
            })
    return {"specific_counts": specific, "shared_counts": shared, "per_phase_counts": per_phase,
            "jaccard": jac, "top_features": top}


def _top_token(view, task, sae, hp, f, text) -> dict:
    """The text token where the feature fires most in this example (for highlighting)."""
    from ..capture import record

    ids, pos = token_positions(task.builder, text, "text")
    if not pos:
        return {"index": -1, "token": ""}
    with torch.no_grad(), record(view, [hp]) as acts:
        view.model(input_ids=torch.tensor([ids], device=view.device), logits_to_keep=1)
        a = sae.encode(acts[hp.name][0, pos].float())[:, f]
    j = int(a.argmax())
    return {"index": j, "token": view.tokenizer.decode([ids[pos[j]]]), "activation": float(a[j])}
