"""Stage `audit`: do prompt changes or a lower weight precision silently break emotion inference?

A reference (the run's evaluated model, precision and prompt) is compared with candidates on the
same examples. For each candidate: accuracy and macro-F1 change with paired-bootstrap intervals,
prediction flip rate, per-emotion recall change; per layer and phase, drift of SAE features at the
answer position (per-example correlation of feature vectors, Jaccard of the top-k active features);
survival of the reference's causal features (still active where they were active) and whether they
still matter (the drop in each emotion's best-other margin when its causal set is zeroed at the
answer position, on `ablation_per_emotion` examples, against the same drop in the reference); and
whether the final phase drifts more than earlier ones, with drift divided by the drift between
unrelated reference examples (raw drift grows with depth for any change, so only the normalised
form can say which phase is fragile) and a bootstrap interval on the final phase's excess. Silent
degradation: AUROC with which a drop in output confidence, and a causal-feature drift score, flag
the examples whose prediction flipped. Thresholds turn the audit into a deployment gate (non-zero exit).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score

from .. import calibrate
from ..artifacts import config_hash, read_json, require, stage_dir, write_json
from ..capture import HookPoint
from ..errors import EmoscopeError
from ..evaluate import EvalConfig, Task
from ..metrics import classification_metrics
from ..models import ModelView
from ..prompts import Template
from ..sae.stage import load_saes
from .causal import ablate, answer_batches, answer_logits, first_token_prior, prompt_batches
from .perturb import PRECISIONS, apply_precision, perturb_text, template_variants


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Label of the candidate in tables.")
    template: Template | None = Field(None, description="Prompt template replacing the reference's.")
    shots: int | None = Field(None, ge=0, description="Number of demonstrations replacing the reference's.")
    demo_seed: int | None = Field(None, description="Seed drawing other demonstrations.")
    text: Literal["lower", "upper", "whitespace", "typos"] | None = Field(None, description="Noise applied to every input text.")
    precision: Literal["float32", "bfloat16", "float16", "int8", "int4", "int3"] | None = Field(
        None, description="Weight precision: float32, bfloat16, float16, or weight-only RTN int8 / int4 / int3.")
    model: str | None = Field(None, description="Another checkpoint of the same model (same tokenizer), e.g. a quantized export.")


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_accuracy_drop: float = Field(0.05, description="Largest tolerated drop in calibrated accuracy.")
    max_flip_rate: float = Field(0.2, description="Largest tolerated share of changed predictions.")
    min_causal_survival: float = Field(0.5, description="Smallest tolerated share of causal features still active.")
    min_effect_retained: float | None = Field(None, description="Smallest tolerated share of the causal sets' ablation effect still there (None: not gated).")


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[Candidate] | Literal["default"] = Field("default", description="Candidates, or 'default': paraphrases, label order, system prompt, demonstrations, text noise, bf16/fp16/int8/int4/int3.")
    thresholds: Thresholds = Thresholds()
    causal_features: dict[str, list[tuple[int, int]]] | None = Field(None, description="Causal features per emotion as [layer, feature] pairs; default: tracing's sets, else the phases stage's top features.")
    ablation_per_emotion: int = Field(20, ge=0, description="Examples per emotion on which each candidate's causal sets are ablated, to see whether they still matter (0: skip).")
    top_k: int = Field(32, ge=1, description="Active features compared by Jaccard per layer.")
    group_size: int = Field(128, ge=8, description="Group size of the RTN weight quantization.")
    n_boot: int = Field(1000, ge=100, description="Paired bootstrap resamples.")
    seed: int = Field(0, description="Seed for text noise, demonstrations and the bootstrap.")


def default_candidates(ev_cfg: EvalConfig, labels: list[str], seed: int) -> list[Candidate]:
    out = [Candidate(name=n, template=t) for n, t in template_variants(ev_cfg.template, labels, seed).items()]
    k = ev_cfg.shots
    out += [Candidate(name="demos_removed" if k else "demos_added", shots=0 if k else len(labels)),
            Candidate(name="demos_changed", shots=max(k, len(labels)), demo_seed=seed + 101)]
    out += [Candidate(name=f"text_{t}", text=t) for t in ("lower", "upper", "whitespace", "typos")]
    out += [Candidate(name=p, precision=p) for p in PRECISIONS if p != "float32"]
    return out


def _observe(view, task, texts, saes, tokens) -> dict:
    """Calibrated predictions and probabilities, and SAE codes at the answer position of every layer."""
    logp = task.score(texts)
    cal = calibrate.apply_prior(logp, task.log_prior())
    codes = {l: [] for l in saes}
    prompts = [task.builder.encode(task.builder.prompt(t)) for t in texts]
    with torch.no_grad():
        for _, ids, mask, last in prompt_batches(view, prompts):
            _, res = answer_logits(view, ids, mask, last, tokens, list(saes))
            rows = torch.arange(len(ids))
            for l, sae in saes.items():
                codes[l].append(sae.encode(res[l][rows, last].float()).cpu().numpy())
    codes = {l: np.nan_to_num(np.concatenate(v), nan=0.0, posinf=0.0, neginf=0.0) for l, v in codes.items()}
    # a candidate can overflow (Gemma in float16 does): such rows count as maximally uncertain and wrong
    bad = ~np.isfinite(cal).all(1)
    cal = np.where(bad[:, None], -np.log(cal.shape[1]), cal)
    return {"cal": cal, "pred": cal.argmax(1), "codes": codes, "prompts": prompts, "non_finite": bad}


def _jaccard_topk(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    ta = np.argsort(-a, 1)[:, :k]
    tb = np.argsort(-b, 1)[:, :k]
    out = []
    for x, y, ra, rb in zip(ta, tb, a, b):
        sa, sb = set(x[ra[x] > 0]), set(y[rb[y] > 0])
        out.append(len(sa & sb) / max(len(sa | sb), 1))
    return np.array(out)


def _rowcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)


def _auroc(score: np.ndarray, flipped: np.ndarray) -> float | None:
    return float(roc_auc_score(flipped, score)) if 0 < flipped.sum() < len(flipped) else None


def run_audit(cfg: AuditConfig, run_dir: str | Path, view: ModelView, load_view, key: str | None = None, progress=None) -> dict:
    """`load_view(name=None)` returns a fresh float32 copy of the model, or of another checkpoint
    (precision candidates modify weights in place)."""
    run_dir = Path(run_dir)
    require(run_dir, *("evaluate", "saes"))
    ev = read_json(run_dir / "evaluate" / "result.json")
    if ev["model"]["name"] != view.name:
        raise EmoscopeError(f"{run_dir} was evaluated with {ev['model']['name']}, not {view.name}")
    preds = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    labels, texts = ev["labels"], list(preds.text)
    y = np.array([labels.index(g) for g in preds.gold])
    saes = {HookPoint.parse(h).layer: s for h, s in load_saes(run_dir, view).items()}
    phase_of = {}
    if (run_dir / "phases" / "result.json").exists():
        phase_of = {HookPoint.parse(h).layer: p for h, p in read_json(run_dir / "phases" / "result.json")["phase_of_layer"].items()}
    n_phases = max(phase_of.values()) + 1 if phase_of else 1
    causal = {k: [list(f) for f in v] for k, v in cfg.causal_features.items()} if cfg.causal_features else _causal_sets(run_dir, labels)
    ev_cfg = EvalConfig.model_validate(ev["config"])
    ref_task = Task(ev_cfg, view)
    tokens = [ids[0] for ids in ref_task.builder.label_ids()]
    ref = _observe(view, ref_task, texts, saes, tokens)
    pick = np.random.default_rng(cfg.seed + 2)
    abl_idx = {lab: np.sort(pick.permutation(np.flatnonzero(y == e))[:cfg.ablation_per_emotion]) for e, lab in enumerate(labels)}
    ref["effects"] = _ablation_effects(view, ref_task, texts, saes, tokens, causal, y, labels, abl_idx)
    # drift baseline per layer: 1 - top-k Jaccard between each reference example and another one (a
    # derangement). Layers differ in how example-specific their codes are, so raw drift grows with
    # depth for any change; drift / unrelated is the fraction of the way to an unrelated input.
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(texts))
    order = np.empty_like(perm)  # order[perm[i]] = perm[i + 1]: one cycle, no example paired with itself
    order[perm] = np.roll(perm, -1)
    unrelated = {l: float(1 - _jaccard_topk(ref["codes"][l], ref["codes"][l][order], cfg.top_k).mean()) for l in saes}
    cands = default_candidates(ev_cfg, labels, cfg.seed) if cfg.candidates == "default" else cfg.candidates
    rng = np.random.default_rng(cfg.seed)
    boots = rng.integers(0, len(y), (cfg.n_boot, len(y)))
    rows = []
    for cand in cands:
        rows.append(_compare(cand, cfg, ev_cfg, view, load_view, texts, y, labels, saes, tokens, ref, causal,
                             phase_of, n_phases, boots, unrelated, abl_idx))
        if progress:
            progress(1)
    result = {"stage": "audit", "config_hash": key or config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
              "model": view.name, "labels": labels, "n": int(len(y)), "seed": cfg.seed, "n_phases": n_phases,
              "reference_accuracy": float((ref["pred"] == y).mean()), "candidates": rows,
              "unrelated_drift": {str(l): v for l, v in unrelated.items()},
              "failed": [r["name"] for r in rows if r["failed"]]}
    with stage_dir(run_dir, "audit") as out:
        write_json(out / "result.json", result)
    return result


def _phase_drift(per_ex: dict, unrelated: dict, phase: dict, n_phases: int, boots: np.ndarray) -> tuple[dict, dict | None]:
    """Normalised drift per phase: the phase's summed drift over its summed unrelated-input drift (a
    ratio of sums, so a layer where unrelated inputs barely differ cannot dominate), None where that
    is undefined; and the final phase's excess over the most-drifting earlier phase, with a bootstrap
    interval over examples (the unrelated-input baseline held fixed)."""
    per_phase = {}
    for p in range(n_phases):
        ls = [l for l in per_ex if phase[l] == p]
        den = sum(unrelated[l] for l in ls)
        num = np.sum([per_ex[l] for l in ls], 0) if ls else None
        if num is None or (den == 0 and num.any()):
            per_phase[p] = None
        else:
            per_phase[p] = num / den if den > 0 else np.zeros_like(num)
    by_phase = {p: (float(v.mean()) if v is not None else None) for p, v in per_phase.items()}
    if n_phases < 2 or any(v is None for v in per_phase.values()):
        return by_phase, None
    m = np.stack([per_phase[p] for p in range(n_phases)])  # phases x examples
    diff = lambda mm: mm[-1] - mm[:-1].max(0)
    boot = diff(m[:, boots].mean(2))
    return by_phase, {"value": float(diff(m.mean(1))), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


def _ablation_effects(view, task, texts, saes, tokens, causal, y, labels, idx) -> dict[str, np.ndarray]:
    """Per emotion: the drop in its calibrated best-other margin on its chosen examples when its causal
    set is zeroed at the answer position (SAE error kept). Non-finite margins (an overflowing
    candidate) count as no effect."""
    prior = first_token_prior(view, task, tokens)
    out = {}
    for e, lab in enumerate(labels):
        feats: dict[int, list[int]] = {}
        for l, f in causal.get(lab, []):
            if l in saes:
                feats.setdefault(int(l), []).append(int(f))
        if not feats or not len(idx[lab]):
            continue
        prompts = [task.builder.encode(task.builder.prompt(texts[i])) for i in idx[lab]]
        try:
            with torch.no_grad():
                batches = answer_batches(view, prompts)
                gold = np.full(len(prompts), e)
                d = ablate(view, saes, batches, gold, tokens, {}, prior) - ablate(view, saes, batches, gold, tokens, feats, prior)
        except EmoscopeError:  # the intervention met non-finite activations: the candidate overflows
            d = np.zeros(len(prompts))
        out[lab] = np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _retained(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], rng, n_boot: int) -> dict | None:
    """Share of the reference's ablation effect still there in the candidate: mean candidate effect over
    mean reference effect on the same examples (all emotions pooled), with a paired bootstrap
    interval; and each emotion's two mean effects."""
    if not ref:
        return None
    r = np.concatenate([ref[k] for k in ref])
    c = np.concatenate([cur.get(k, np.zeros_like(ref[k])) for k in ref])
    if r.mean() <= 0:
        return None
    boots = rng.integers(0, len(r), (n_boot, len(r)))
    ratio = c[boots].mean(1) / np.maximum(r[boots].mean(1), 1e-9)
    return {"value": float(c.mean() / r.mean()), "lo": float(np.percentile(ratio, 2.5)), "hi": float(np.percentile(ratio, 97.5)),
            "n": int(len(r)), "per_emotion": {k: {"reference": float(ref[k].mean()), "candidate": float(cur.get(k, np.zeros(1)).mean())}
                                              for k in ref}}


def _causal_sets(run_dir: Path, labels: list[str]) -> dict[str, list[list[int]]]:
    """Causal features per emotion: tracing's chosen sets, else the phases stage's top features."""
    if (run_dir / "trace" / "result.json").exists():
        tr = read_json(run_dir / "trace" / "result.json")
        return {lab: [f for p in e["phases"].values() for f in p["set"]] for lab, e in tr["emotions"].items()}
    if (run_dir / "phases" / "result.json").exists():
        ph = read_json(run_dir / "phases" / "result.json")
        return {lab: [[f["layer"], f["feature"]] for f in fs] for lab, fs in ph["top_features"].items()}
    return {}


def _compare(cand, cfg, ev_cfg, view, load_view, texts, y, labels, saes, tokens, ref, causal, phase_of, n_phases, boots,
             unrelated, abl_idx) -> dict:
    c_cfg = ev_cfg.model_copy(deep=True)
    if cand.template is not None:
        c_cfg.template = cand.template
    if cand.shots is not None:
        c_cfg.shots = cand.shots
    if cand.demo_seed is not None:
        c_cfg.seed = cand.demo_seed
    c_view = view
    info = {}
    if cand.model is not None:
        c_view = load_view(cand.model)
        if c_view.tokenizer.get_vocab() != view.tokenizer.get_vocab():
            raise EmoscopeError(f"candidate {cand.name}: {cand.model} has another tokenizer than the reference; "
                                "features could not be aligned, so it cannot be audited against it")
    if cand.precision is not None:
        c_view = load_view(cand.model) if c_view is view else c_view
        info = apply_precision(c_view, cand.precision, cfg.group_size)
    c_texts = texts
    if cand.text is not None:
        r = random.Random(cfg.seed)
        c_texts = [perturb_text(t, cand.text, r) for t in texts]
    task = Task(c_cfg, c_view)
    cur = _observe(c_view, task, c_texts, saes, tokens)
    K = len(labels)
    cur["pred"] = np.where(cur["non_finite"], (y + 1) % K, cur["pred"])  # never the gold label
    acc_r, acc_c = (ref["pred"] == y), (cur["pred"] == y)
    d_acc = acc_c.mean() - acc_r.mean()
    boot_d = acc_c[boots].mean(1) - acc_r[boots].mean(1)
    m_r = classification_metrics(y, ref["pred"], labels, 200)
    m_c = classification_metrics(y, cur["pred"], labels, 200)
    flipped = ref["pred"] != cur["pred"]
    layers = sorted(saes)
    drift, per_ex = {}, {}
    for l in layers:
        per_ex[l] = 1 - _jaccard_topk(ref["codes"][l], cur["codes"][l], cfg.top_k)
        jac = float(1 - per_ex[l].mean())
        drift[l] = {"corr": float(_rowcorr(ref["codes"][l], cur["codes"][l]).mean()), "jaccard": jac,
                    "normalized": (1 - jac) / unrelated[l] if unrelated[l] > 0 else (0.0 if jac == 1 else None),
                    "phase": int(phase_of.get(l, 0))}
    by_phase_raw = {p: float(np.mean([1 - drift[l]["jaccard"] for l in layers if drift[l]["phase"] == p] or [np.nan])) for p in range(n_phases)}
    by_phase, excess = _phase_drift(per_ex, unrelated, {l: d["phase"] for l, d in drift.items()}, n_phases, boots)
    # causal features: active in the candidate where they were active in the reference
    alive, total, fdrift = 0, 0, np.zeros(len(y))
    for e, lab in enumerate(labels):
        feats = causal.get(lab, [])
        idx = np.flatnonzero(y == e)
        for l, f in feats:
            if l not in saes:
                continue
            on = ref["codes"][l][idx, f] > 0
            total += int(on.sum())
            alive += int((cur["codes"][l][idx, f] > 0)[on].sum())
            a, b = ref["codes"][l][idx, f], cur["codes"][l][idx, f]
            fdrift[idx] += np.abs(a - b) / (np.abs(a) + 1e-6) / max(len(feats), 1)
    survival = alive / total if total else None
    retained = _retained(ref["effects"], _ablation_effects(c_view, task, c_texts, saes, tokens, causal, y, labels, abl_idx),
                         np.random.default_rng(cfg.seed + 3), cfg.n_boot)
    conf_drop = ref["cal"].max(1) - cur["cal"].max(1)
    ent = lambda c: -(np.exp(c) * c).sum(1)
    margin = lambda c: np.sort(c, 1)[:, -1] - np.sort(c, 1)[:, -2]
    t = cfg.thresholds
    failed = cur["non_finite"].any() or (-d_acc > t.max_accuracy_drop) or (flipped.mean() > t.max_flip_rate) or \
             (survival is not None and survival < t.min_causal_survival) or \
             (t.min_effect_retained is not None and retained is not None and retained["value"] < t.min_effect_retained)
    return {
        "name": cand.name, **info, "accuracy": float(acc_c.mean()), "non_finite_frac": float(cur["non_finite"].mean()),
        "accuracy_change": {"value": float(d_acc), "lo": float(np.percentile(boot_d, 2.5)), "hi": float(np.percentile(boot_d, 97.5))},
        "macro_f1_change": m_c["macro_f1"]["value"] - m_r["macro_f1"]["value"],
        "flip_rate": float(flipped.mean()),
        "recall_change": {lab: m_c["per_class"][lab]["recall"]["value"] - m_r["per_class"][lab]["recall"]["value"] for lab in labels},
        "drift": {str(l): d for l, d in drift.items()}, "drift_by_phase": {str(p): v for p, v in by_phase.items()},
        "drift_by_phase_raw": {str(p): v for p, v in by_phase_raw.items()},
        "final_phase_excess": excess,
        "final_phase_drifts_most": bool(excess is not None and excess["value"] >= 0),
        "causal_survival": survival, "causal_effect": retained,
        "detection_auroc": {"confidence_drop": _auroc(conf_drop, flipped), "entropy_rise": _auroc(ent(cur["cal"]) - ent(ref["cal"]), flipped),
                            "margin_drop": _auroc(margin(ref["cal"]) - margin(cur["cal"]), flipped),
                            "causal_feature_drift": _auroc(fdrift, flipped) if total else None},
        "failed": bool(failed),
    }
