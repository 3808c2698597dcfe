"""Stage `trace`: phase-stratified causal tracing of SAE features (claim 3).

For each emotion, on the examples of that emotion (correctly classified by default):
1. screen every feature of every SAE layer with attribution patching (one backward pass per batch);
2. within each phase, validate the top candidates with exact single-feature ablation at the answer
   position (SAE error term kept), with bootstrap intervals over examples, and report the rank
   correlation between attribution and exact effects;
3. grow the smallest set (greedy by exact effect, verified jointly) that removes 50% and 80% of the
   mean calibrated margin; measure concentration (effective number of features, Gini);
4. controls: the same number of random features from the same layers, and the same screen with
   shuffled emotion labels;
5. cross-emotion effects: ablating emotion A's set, the change in the margin of B's examples.
The margin is the calibrated log-probability of the gold label's first token minus that of the best
other label (`margin: best_other`, positive exactly when the calibrated prediction is gold), or the
log-odds of gold against all other labels together (`margin: all_others`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr

from ..artifacts import config_hash, read_json, require, stage_dir, write_json
from ..capture import HookPoint
from ..errors import EmoscopeError
from ..evaluate import EvalConfig, Task
from ..models import ModelView
from ..sae.stage import load_saes
from .causal import ablate, answer_batches, answer_logits, attribution, first_token_prior, prompt_batches


class TraceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: str = Field("correct", pattern="^(correct|all)$", description="Trace on correctly classified examples, or all.")
    per_emotion: int = Field(16, ge=2, description="Most examples traced per emotion.")
    margin: str = Field("best_other", pattern="^(best_other|all_others)$", description="Traced metric: calibrated log-prob of gold minus the best other label, or log-odds of gold against all others.")
    baseline: str = Field("zero", pattern="^(zero|mean)$", description="Ablation value: zero, or the feature's mean over all examples.")
    candidates: int = Field(8, ge=1, description="Top attribution candidates validated exactly per emotion and phase.")
    n_random: int = Field(20, ge=1, description="Random feature sets in the control.")
    n_boot: int = Field(500, ge=50, description="Bootstrap resamples over examples for effect intervals.")
    seed: int = Field(0, description="Seed for random controls, shuffles and the bootstrap.")


def _ci(x: np.ndarray, rng, n_boot: int) -> dict:
    boot = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(x))}


def _concentration(effects: np.ndarray) -> dict:
    e = np.clip(np.asarray(effects, float), 0, None)
    if e.sum() <= 0:
        return {"effective_n": 0.0, "gini": float("nan")}
    s = np.sort(e)
    n = len(s)
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(s) / (n * s.sum()))
    return {"effective_n": float(e.sum() ** 2 / (e ** 2).sum()), "gini": gini}


def run_trace(cfg: TraceConfig, run_dir: str | Path, view: ModelView, key: str | None = None, progress=None) -> dict:
    run_dir = Path(run_dir)
    require(run_dir, *("evaluate", "saes", "phases"))
    ev = read_json(run_dir / "evaluate" / "result.json")
    if ev["model"]["name"] != view.name:
        raise EmoscopeError(f"{run_dir} was evaluated with {ev['model']['name']}, not {view.name}")
    ph = read_json(run_dir / "phases" / "result.json")
    import pandas as pd
    preds = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    saes_by_hook = load_saes(run_dir, view)
    saes = {HookPoint.parse(h).layer: s for h, s in saes_by_hook.items()}
    phase_of = {HookPoint.parse(h).layer: p for h, p in ph["phase_of_layer"].items()}
    n_phases = ph["n_phases"]
    labels = ev["labels"]
    task = Task(EvalConfig.model_validate(ev["config"]), view)
    tokens = [ids[0] for ids in task.builder.label_ids()]
    prior = first_token_prior(view, task, tokens)
    rng = np.random.default_rng(cfg.seed)
    pool = preds if cfg.examples == "all" else preds[preds.correct_cal]
    baseline = None
    if cfg.baseline == "mean":
        allp = [task.builder.encode(task.builder.prompt(t)) for t in preds.text]
        baseline = _mean_features(view, saes, allp)
    ctx = {"tokens": tokens, "log_prior": prior, "baseline": baseline, "kind": cfg.margin}
    per_emotion, skipped, sets = {}, {}, {}
    for e, lab in enumerate(labels):
        rows = pool[pool.gold == lab]
        if len(rows) < 2:
            skipped[lab] = f"{len(rows)} {'correct ' if cfg.examples == 'correct' else ''}examples"
            continue
        rows = rows.iloc[rng.permutation(len(rows))[:cfg.per_emotion]]
        prompts = answer_batches(view, [task.builder.encode(task.builder.prompt(t)) for t in rows.text])
        gold = np.full(len(rows), e)
        attr, clean = attribution(view, saes, prompts, gold, **ctx)
        est = {l: -a.mean(0) for l, a in attr.items()}  # estimated margin drop when ablated
        res = {"n": len(rows), "clean_margin": _ci(clean, rng, cfg.n_boot), "phases": {}}
        shuffled = _shuffled_screen(view, saes, pool, labels, task, ctx, lab, len(rows), rng, phase_of)
        for p in range(n_phases):
            layers = [l for l in saes if phase_of[l] == p]
            cand = sorted(((est[l][f], l, int(f)) for l in layers for f in np.argsort(-est[l])[:cfg.candidates]), reverse=True)[:cfg.candidates]
            exact = []
            for a, l, f in cand:
                m = ablate(view, saes, prompts, gold, features={l: [f]}, **ctx)
                exact.append({"layer": l, "feature": f, "attribution": float(a), "effect": _ci(clean - m, rng, cfg.n_boot)})
            exact.sort(key=lambda r: -r["effect"]["value"])
            rho = spearmanr([r["attribution"] for r in exact], [r["effect"]["value"] for r in exact]).statistic if len(exact) > 2 else float("nan")
            chosen, need = _greedy_sets(view, saes, prompts, gold, ctx, exact, clean)
            # control: as many random features, drawn among those that can matter here (nonzero
            # attribution, i.e. active on some traced example under zero ablation): inactive features
            # have exactly zero ablation effect, and drawing them would make any set look special
            live = [(l, int(f)) for l in layers for f in np.flatnonzero(np.abs(attr[l]).sum(0) > 0)]
            rand = []
            size = max(len(chosen), 1)
            for _ in range(cfg.n_random if live else 0):
                feats = {}
                for i in rng.choice(len(live), min(size, len(live)), replace=False):
                    feats.setdefault(live[i][0], []).append(live[i][1])
                rand.append(float((clean - ablate(view, saes, prompts, gold, features=feats, **ctx)).mean()))
            rand = rand or [0.0]
            joint = float((clean - ablate(view, saes, prompts, gold, features=_group(chosen), **ctx)).mean()) if chosen else 0.0
            res["phases"][str(p)] = {
                "layers": layers, "features": exact, "rank_correlation": float(rho),
                "n_for_50": need[0.5], "n_for_80": need[0.8], "set": chosen, "set_effect": joint,
                **_concentration([r["effect"]["value"] for r in exact]),
                "random_control": {"size": size, "mean": float(np.mean(rand)), "lo": float(np.percentile(rand, 2.5)),
                                   "hi": float(np.percentile(rand, 97.5)), "n": cfg.n_random if live else 0, "pool": len(live),
                                   "drawn_from": "features with nonzero attribution in the phase's layers"},
                "top_attribution": float(cand[0][0]) if cand else None,
                "shuffled_label_top_attribution": shuffled["top_attribution_by_phase"].get(str(p)),
            }
            sets.setdefault(lab, []).extend(chosen)
            if progress:
                progress(1)
        best = max(res["phases"], key=lambda p: res["phases"][p]["features"][0]["effect"]["value"] if res["phases"][p]["features"] else -1e9)
        res["strongest_phase"] = int(best)
        per_emotion[lab] = res
    cross = _cross(view, saes, pool, labels, task, ctx, sets, cfg)
    result = {"stage": "trace", "config_hash": key or config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
              "model": view.name, "labels": labels, "n_phases": n_phases, "phase_names": ph["phase_names"],
              "seed": cfg.seed, "emotions": per_emotion, "skipped": skipped, "cross_effects": cross,
              "log_prior": prior.tolist(),
              # the metric reads each label's first token; where a label has more, it is a proxy for the
              # whole label the evaluation scores (e.g. 'f' for 'fear' in a chat template without a space)
              "label_first_tokens": {lab: {"first": view.tokenizer.decode([ids[0]]), "n_tokens": len(ids)}
                                     for lab, ids in zip(labels, task.builder.label_ids())}}
    with stage_dir(run_dir, "trace") as out:
        write_json(out / "result.json", result)
    return result


def _group(feats: list[list[int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, f in feats:
        out.setdefault(l, []).append(f)
    return out


def _greedy_sets(view, saes, prompts, gold, ctx, exact, clean):
    """Add validated features in order of exact effect; the first sizes whose joint ablation removes
    50% and 80% of the mean clean margin (None when the candidates never get there)."""
    need = {0.5: None, 0.8: None}
    chosen: list[list[int]] = []
    base = clean.mean()
    if base <= 0:
        return chosen, need
    for r in exact:
        if r["effect"]["value"] <= 0:
            break
        chosen.append([r["layer"], r["feature"]])
        removed = (base - ablate(view, saes, prompts, gold, features=_group(chosen), **ctx).mean()) / base
        for q in need:
            if need[q] is None and removed >= q:
                need[q] = len(chosen)
        if need[0.8] is not None:
            break
    return chosen, need


def _shuffled_screen(view, saes, pool, labels, task, ctx, lab, n, rng, phase_of) -> dict:
    """Control: examples drawn regardless of emotion but scored as if they were `lab`; the largest
    attribution estimate in each phase, to set beside the real screen's."""
    rows = pool.iloc[rng.permutation(len(pool))[:n]]
    prompts = [task.builder.encode(task.builder.prompt(t)) for t in rows.text]
    gold = np.full(len(prompts), labels.index(lab))
    attr, _ = attribution(view, saes, prompts, gold, **ctx)
    top: dict[str, float] = {}
    for l, a in attr.items():
        p = str(phase_of[l])
        top[p] = max(top.get(p, -np.inf), float((-a.mean(0)).max()))
    return {"examples": int(len(prompts)), "top_attribution_by_phase": top}


def _cross(view, saes, pool, labels, task, ctx, sets, cfg) -> dict:
    """Mean margin change of B's examples when A's chosen features (all phases) are ablated."""
    out = {a: {} for a, feats in sets.items() if feats}
    for b, lab in enumerate(labels):
        rows = pool[pool.gold == lab].iloc[:cfg.per_emotion]
        if len(rows) < 2 or not out:
            continue
        prompts = answer_batches(view, [task.builder.encode(task.builder.prompt(t)) for t in rows.text])
        gold = np.full(len(rows), b)
        clean = ablate(view, saes, prompts, gold, features={}, **ctx)
        for a in out:
            out[a][lab] = float((ablate(view, saes, prompts, gold, features=_group(sets[a]), **ctx) - clean).mean())
    return out


def _mean_features(view, saes, prompts, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Each layer's mean feature activation at the answer position over the given prompts."""
    sums = {l: 0 for l in saes}
    with torch.no_grad():
        for _, ids, mask, last in prompt_batches(view, prompts, batch_size):
            _, res = answer_logits(view, ids, mask, last, [0], list(saes))
            rows = torch.arange(len(ids))
            for l, sae in saes.items():
                sums[l] = sums[l] + sae.encode(res[l][rows, last].float()).sum(0)
    return {l: (s / len(prompts))[None] for l, s in sums.items()}
