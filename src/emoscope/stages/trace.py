"""Stage `trace`: phase-stratified causal tracing of SAE features (claim 3).

`trace(task, saes, evaluation, phases)` returns a `TraceResult`.

For each emotion, on the examples of that emotion (correctly classified by default):
1. screen every feature of every SAE layer with attribution patching (one backward pass per batch), or
   with `screen: exact`, by ablating every feature active on the traced examples exactly (many per pass);
2. within each phase, validate the top candidates with exact single-feature ablation at the answer
   position (SAE error term kept), with bootstrap intervals over examples, and report the rank
   correlation between attribution and exact effects;
3. grow the smallest set (greedy by exact effect, verified jointly) that removes 50% and 80% of the
   mean calibrated margin; measure concentration (effective number of features, Gini);
4. controls: the same number of random features from the same layers, and the same screen with
   shuffled emotion labels;
5. cross-emotion effects: ablating emotion A's set, the change in the margin of B's examples;
6. why some emotions are harder: per emotion, recall and confusion partners beside the causal numbers
   (`analysis.difficulty`, in `difficulty`);
7. a feature card (`sae.cards`) for every validated feature the phases stage has none for (`cards`).
The margin is the calibrated log-probability of the gold label's first token minus that of the best
other label (`margin: best_other`, positive exactly when the calibrated prediction is gold), or the
log-odds of gold against all other labels together (`margin: all_others`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr

from ..backends.base import require
from ..analysis.difficulty import difficulty
from ..analysis.stats import concentration, mean_ci
from ..artifacts import config_hash
from .. import distributed as dist
from ..errors import validated
from ..hooks import layer_of, residual_by_layer
from ..interventions.answers import answer_batches, answer_resid, first_token_prior
from ..interventions.effects import ablate_each, attribution
from ..sae.cards import card_key, feature_cards
from ..task import Task
from .base import Stage, StageResult
from .evaluate import EvalResult
from .phases import PhasesResult
from ..constraints import Seed


class TraceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    examples: str = Field("correct", pattern="^(correct|all)$")
    """Trace on correctly classified examples, or all."""
    per_emotion: int = Field(16, ge=2)
    """Most examples traced per emotion."""
    margin: str = Field("best_other", pattern="^(best_other|all_others)$")
    """Traced metric: calibrated log-prob of gold minus the best other label, or log-odds of gold against all others."""
    baseline: str = Field("zero", pattern="^(zero|mean)$")
    """Ablation value: zero, or the feature's mean over all examples."""
    screen: str = Field("attribution", pattern="^(attribution|exact)$")
    """How features are ranked before validation: `attribution` (first order, one backward pass per batch) or
    `exact` (every feature active on the traced examples ablated alone, many per pass: slower, and right where
    first order is not, e.g. where the screen check flags the attribution screen)."""
    candidates: int = Field(8, ge=1)
    """Top screen candidates validated exactly per emotion and phase."""
    n_random: int = Field(20, ge=1)
    """Random feature sets in the control."""
    n_boot: int = Field(500, ge=50)
    """Bootstrap resamples over examples for effect intervals."""
    seed: Seed = 0
    """Seed for random controls, shuffles and the bootstrap."""
    screen_check: int = Field(8, ge=0)
    """Random features with nonzero attribution per emotion and phase, ablated exactly beside the validated
    candidates to measure how well the attribution screen ranks effects (0: skip; not run with `screen: exact`)."""
    min_screen_agreement: float = Field(0.5, ge=-1, le=1)
    """A screen whose attribution-vs-exact Spearman is below this, or that a sampled feature beats, is flagged."""


class TraceResult(StageResult):
    """Causal features per emotion and phase: `to_frame()` lists every validated feature with its exact
    effect; `causal_sets` the greedy sets that remove the margin."""

    stage = "trace"

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for lab, e in self.data["emotions"].items():
            for p, ph in e["phases"].items():
                for f in ph["features"]:
                    rows.append({"emotion": lab, "phase": int(p), "layer": f["layer"], "feature": f["feature"],
                                 "attribution": f["attribution"], "effect": f["effect"]["value"],
                                 "effect_lo": f["effect"]["lo"], "effect_hi": f["effect"]["hi"],
                                 "in_set": [f["layer"], f["feature"]] in ph["set"]})
        return pd.DataFrame(rows)

    def difficulty_frame(self) -> pd.DataFrame:
        """One row per emotion: recall, main confusion partner, concentration, top effect, partner cross-effect."""
        rows = []
        for lab, r in self.data["difficulty"]["emotions"].items():
            part = r["partners"][0] if r["partners"] else {"label": None, "share": 0.0}
            rows.append({"emotion": lab, "recall": r["recall"]["value"], "support": r["support"],
                         "partner": part["label"], "partner_share": part["share"], "effective_n": r["effective_n"],
                         "n_for_80": r["n_for_80"], "top_effect": (r["top_effect"] or {}).get("value"),
                         "beats_random": r["beats_random"], "selective": r.get("selective"),
                         "partner_cross_effect": (r["partner_cross_effect"] or {}).get("value")})
        return pd.DataFrame(rows)

    @property
    def causal_sets(self) -> dict[str, list[tuple[int, int]]]:
        """Per emotion, the (layer, feature) pairs of its chosen sets over all phases."""
        return {lab: [tuple(f) for p in e["phases"].values() for f in p["set"]] for lab,
                e in self.data["emotions"].items()}


@dataclass
class _Tracer:
    """What every ablation of a traced emotion shares: the model, SAEs by layer, the metric's settings."""
    task: Task
    saes: dict
    cfg: TraceConfig
    ctx: dict  # tokens, log_prior, baseline, kind: the keyword arguments of attribution/ablate
    rng: np.random.Generator
    check_rng: np.random.Generator  # the screen check's own draws: the others stay as they were without it

    def ablate_each(self, prompts, gold, sets) -> np.ndarray:
        """ablate() for each feature set, [len(sets), n], several sets per pass."""
        return ablate_each(self.task.model, self.saes, prompts, gold, sets=sets, **self.ctx)

    def attribution(self, prompts, gold):
        return attribution(self.task.model, self.saes, prompts, gold, **self.ctx)


def trace(task: Task, saes: dict, evaluation: EvalResult, phases: PhasesResult,
          config: TraceConfig | dict | None = None, progress=None) -> TraceResult:
    """For each emotion: screen every feature by attribution, validate the top ones per phase by exact
    ablation, grow the 50%/80% sets, and measure controls and cross-emotion effects."""
    cfg = config if isinstance(config, TraceConfig) else validated(TraceConfig, config or {}, "trace.")
    require(task.model, "trace")
    view, preds, labels = task.model, evaluation.predictions, evaluation.labels
    by_layer = residual_by_layer(saes, "trace")
    phase_of = phases.phase_of_layer
    prior = first_token_prior(task)
    rng = np.random.default_rng(cfg.seed)
    pool = preds if cfg.examples == "all" else preds[preds.correct_cal]
    baseline = _mean_features(task, by_layer, task.encode_all(preds.text)) if cfg.baseline == "mean" else None
    tr = _Tracer(task, by_layer, cfg, {"tokens": task.label_tokens, "log_prior": prior, "baseline": baseline,
                                       "kind": cfg.margin}, rng, np.random.default_rng(cfg.seed + 7919))
    per_emotion, skipped, sets = {}, {}, {}
    for e, lab in enumerate(labels):
        rows = pool[pool.gold == lab]
        if len(rows) < 2:
            skipped[lab] = f"{len(rows)} {'correct ' if cfg.examples == 'correct' else ''}examples"
            continue
        rows = rows.iloc[rng.permutation(len(rows))[:cfg.per_emotion]]
        per_emotion[lab] = _trace_emotion(tr, rows, e, lab, pool, labels, phase_of, phases.n_phases, sets, progress)
    data = {"stage": "trace", "config_hash": config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
            "model": view.name, "labels": labels, "n_phases": phases.n_phases, "phase_names": phases["phase_names"],
            "seed": cfg.seed, "emotions": per_emotion, "skipped": skipped,
            **_cross(tr, pool, labels, sets), "log_prior": prior.tolist(),
            # the metric reads each label's first token; where a label has more, it is a proxy for the
            # whole label the evaluation scores (e.g. 'f' for 'fear' in a chat template without a space)
            "label_first_tokens": {lab: {"first": view.tokenizer.decode([ids[0]]), "n_tokens": len(ids)}
                                   for lab, ids in zip(labels, task.label_ids)}}
    data["difficulty"] = difficulty(evaluation.data, phases.data, data)
    data["cards"] = _cards(task, saes, evaluation, phases, per_emotion)
    return TraceResult(data)


def _trace_emotion(tr: _Tracer, rows, e, lab, pool, labels, phase_of, n_phases, sets, progress) -> dict:
    cfg = tr.cfg
    prompts = answer_batches(tr.task.model, tr.task.encode_all(rows.text))
    gold = np.full(len(rows), e)
    attr, clean = tr.attribution(prompts, gold)
    est = {layer: -a.mean(0) for layer, a in attr.items()}  # estimated margin drop when ablated
    rank = est if cfg.screen == "attribution" else _exact_screen(tr, prompts, gold, clean, attr)
    res = {"n": len(rows), "clean_margin": mean_ci(clean, tr.rng, cfg.n_boot), "phases": {}}
    shuffled = _shuffled_screen(tr, pool, labels, lab, len(rows), phase_of)
    for p in range(n_phases):
        layers = [layer for layer in tr.saes if phase_of[layer] == p]
        res["phases"][str(p)] = _validate_phase(tr, prompts, gold, clean, attr, est, layers, rank)
        res["phases"][str(p)]["shuffled_label_top_attribution"] = shuffled.get(str(p))
        sets.setdefault(lab, []).extend(res["phases"][str(p)]["set"])
        if progress:
            progress(1)
    res["strongest_phase"] = int(max(res["phases"], key=lambda p: res["phases"][p]["features"][0]["effect"]["value"]
                                     if res["phases"][p]["features"] else -1e9))
    return res


def _validate_phase(tr: _Tracer, prompts, gold, clean, attr, est, layers, rank) -> dict:
    """Exact effects of the phase's top screen candidates (by `rank`: the attribution estimates `est`, or
    exact effects), the greedy sets, and the random control."""
    cfg = tr.cfg
    cand = sorted(((rank[layer][f], layer, int(f)) for layer in layers
                   for f in np.argsort(-rank[layer])[:cfg.candidates]),
                  reverse=True)[:cfg.candidates]
    margins = tr.ablate_each(prompts, gold, [{layer: [f]} for _, layer, f in cand])
    exact = [{"layer": layer, "feature": f, "attribution": float(est[layer][f]),
              "effect": mean_ci(clean - m, tr.rng, cfg.n_boot)} for (_, layer, f), m in zip(cand, margins)]
    exact.sort(key=lambda r: -r["effect"]["value"])
    rho = (spearmanr([r["attribution"] for r in exact], [r["effect"]["value"] for r in exact]).statistic
           if len(exact) > 2 else float("nan"))
    chosen, need, joint = _greedy_sets(tr, prompts, gold, exact, clean)
    control = _random_control(tr, prompts, gold, clean, attr, layers, max(len(chosen), 1))
    out = {"layers": layers, "features": exact, "rank_correlation": float(rho),
           "n_for_50": need[0.5], "n_for_80": need[0.8], "set": chosen, "set_effect": joint,
           **concentration([r["effect"]["value"] for r in exact]),
           "random_control": control, "top_attribution": max(float(est[layer].max()) for layer in layers) if cand
           else None}
    if tr.cfg.screen_check and tr.cfg.screen == "attribution":
        out["screen_check"] = _screen_check(tr, prompts, gold, clean, attr, est, layers, exact)
    return out


def _exact_screen(tr: _Tracer, prompts, gold, clean, attr) -> dict[int, np.ndarray]:
    """Every feature's exact mean margin drop when set to the baseline alone: by ablate_each for those with
    nonzero attribution (unequal to the baseline on some traced example), exactly zero for the others."""
    live = [(layer, int(f)) for layer in attr for f in np.flatnonzero(np.abs(attr[layer]).sum(0) > 0)]
    drops = (clean - tr.ablate_each(prompts, gold, [{layer: [f]} for layer, f in live])).mean(1)
    out = {layer: np.zeros(a.shape[1]) for layer, a in attr.items()}
    for (layer, f), d in zip(live, drops):
        out[layer][f] = d
    return out


def _screen_check(tr: _Tracer, prompts, gold, clean, attr, est, layers, exact) -> dict | None:
    """How far the attribution screen can be trusted here. `screen_check` random features of the phase with
    nonzero attribution are ablated exactly beside the validated candidates: the Spearman correlation of
    attribution and exact effect over all of them (bootstrap interval over features), the share of the
    k largest exact effects that the screen had picked (k = candidates validated), and the sampled features
    whose exact effect beats the best validated one (with the number expected in the whole phase)."""
    chosen = {(r["layer"], r["feature"]) for r in exact}
    live = [(layer, int(f)) for layer in layers for f in np.flatnonzero(np.abs(attr[layer]).sum(0) > 0)
            if (layer, int(f)) not in chosen]
    if not live or not exact:
        return None
    pick = [live[i] for i in tr.check_rng.choice(len(live), min(tr.cfg.screen_check, len(live)), replace=False)]
    margins = tr.ablate_each(prompts, gold, [{layer: [f]} for layer, f in pick])
    sampled = [(float(est[layer][f]), float((clean - m).mean()), layer, f) for (layer, f), m in zip(pick, margins)]
    att = np.array([r["attribution"] for r in exact] + [s[0] for s in sampled])
    eff = np.array([r["effect"]["value"] for r in exact] + [s[1] for s in sampled])
    screened = np.arange(len(att)) < len(exact)
    rho = _spearman(att, eff)
    boot = [_spearman(att[i], eff[i]) for i in tr.check_rng.integers(0, len(att), (200, len(att)))]
    boot = [b for b in boot if b == b]
    best = max(r["effect"]["value"] for r in exact)
    beats = [[layer, f, e] for _, e, layer, f in sampled if e > best]
    recall = float(screened[np.argsort(-eff, kind="stable")[:len(exact)]].mean())
    flagged = bool(rho != rho or rho < tr.cfg.min_screen_agreement or beats)
    return {"sampled": len(pick), "pool": len(live) + len(exact),
            "spearman": {"value": rho, "lo": float(np.percentile(boot, 2.5)) if boot else None,
                         "hi": float(np.percentile(boot, 97.5)) if boot else None, "n": int(len(att))},
            "top_recall": {"value": recall, "k": len(exact)}, "beats_best": beats,
            "beats_best_expected": len(beats) / len(pick) * len(live), "flagged": flagged}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _random_control(tr: _Tracer, prompts, gold, clean, attr, layers, size: int) -> dict:
    """As many random features, drawn among those that can matter here (nonzero attribution, i.e. active
    on some traced example under zero ablation): inactive features have exactly zero ablation effect,
    and drawing them would make any set look special."""
    cfg = tr.cfg
    live = [(layer, int(f)) for layer in layers for f in np.flatnonzero(np.abs(attr[layer]).sum(0) > 0)]
    sets = [_group([live[i] for i in tr.rng.choice(len(live), min(size, len(live)), replace=False)])
            for _ in range(cfg.n_random if live else 0)]
    rand = [float((clean - m).mean()) for m in tr.ablate_each(prompts, gold, sets)] or [0.0]
    return {"size": size, "mean": float(np.mean(rand)), "lo": float(np.percentile(rand, 2.5)),
            "hi": float(np.percentile(rand, 97.5)), "n": cfg.n_random if live else 0, "pool": len(live),
            "drawn_from": "features with nonzero attribution in the phase's layers"}


def _group(feats: list[list[int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, f in feats:
        out.setdefault(layer, []).append(f)
    return out


def _greedy_sets(tr: _Tracer, prompts, gold, exact, clean):
    """Add validated features in order of exact effect (positive ones); the first sizes whose joint
    ablation removes 50% and 80% of the mean clean margin (None when the candidates never get there), the
    features up to the 80% set (or all), and the mean margin drop when they are ablated together."""
    need = {0.5: None, 0.8: None}
    base = clean.mean()
    order = [[r["layer"], r["feature"]] for r in exact if r["effect"]["value"] > 0] if base > 0 else []
    if not order:
        return [], need, 0.0
    drops = base - tr.ablate_each(prompts, gold, [_group(order[:k]) for k in range(1, len(order) + 1)]).mean(1)
    for k, removed in enumerate(drops / base, 1):
        for q in need:
            if need[q] is None and removed >= q:
                need[q] = k
        if need[0.8] is not None:
            break
    return order[:k], need, float(drops[k - 1])


def _shuffled_screen(tr: _Tracer, pool, labels, lab, n, phase_of) -> dict[str, float]:
    """Control: examples drawn regardless of emotion but scored as if they were `lab`; the largest
    attribution estimate in each phase, to set beside the real screen's."""
    rows = pool.iloc[tr.rng.permutation(len(pool))[:n]]
    prompts = tr.task.encode_all(rows.text)
    attr, _ = tr.attribution(prompts, np.full(len(prompts), labels.index(lab)))
    top: dict[str, float] = {}
    for layer, a in attr.items():
        p = str(phase_of[layer])
        top[p] = max(top.get(p, -np.inf), float((-a.mean(0)).max()))
    return top


def _cross(tr: _Tracer, pool, labels, sets) -> dict:
    """Margin change of B's examples when A's chosen features (all phases) are ablated: the mean
    (`cross_effects`) and the mean with its bootstrap interval over B's examples (`cross_effects_ci`; its own
    seed, so the other intervals are as they were without it)."""
    out = {a: {} for a, feats in sets.items() if feats}
    rng = np.random.default_rng(tr.cfg.seed + 1)
    for b, lab in enumerate(labels):
        rows = pool[pool.gold == lab].iloc[:tr.cfg.per_emotion]
        if len(rows) < 2 or not out:
            continue
        prompts = answer_batches(tr.task.model, tr.task.encode_all(rows.text))
        gold = np.full(len(rows), b)
        clean, *ablated = tr.ablate_each(prompts, gold, [{}] + [_group(sets[a]) for a in out])
        for a, m in zip(out, ablated):
            out[a][lab] = mean_ci(m - clean, rng, tr.cfg.n_boot)
    return {"cross_effects": {a: {b: e["value"] for b, e in row.items()} for a, row in out.items()},
            "cross_effects_ci": out}


def _cards(task: Task, saes: dict, evaluation: EvalResult, phases: PhasesResult, per_emotion: dict) -> dict:
    """Feature cards of every validated feature that the phases stage has no card for, read from its
    activation stores (or one capture of the evaluated examples, in a single process)."""
    hook_of = {layer_of(h): h for h in saes}
    have = set(phases.data.get("cards") or {})
    feats = sorted({(hook_of[f["layer"]], f["feature"]) for e in per_emotion.values() for p in e["phases"].values()
                    for f in p["features"] if card_key(hook_of[f["layer"]], f["feature"]) not in have},
                   key=lambda hf: (layer_of(hf[0]), hf[1]))
    stores = phases.stores
    if not feats or (stores is None and dist.world_size() > 1):
        return {}
    return feature_cards(task, saes, feats, evaluation.examples(), evaluation.labels, stores)


def _mean_features(task: Task, saes: dict, prompts) -> dict[int, torch.Tensor]:
    """Each layer's mean feature activation at the answer position over the given prompts."""
    with torch.no_grad():
        parts = dist.gather(lambda: [{layer: sae.encode(res[layer]).sum(0).cpu() for layer, sae in saes.items()}
                                     for res in answer_resid(task.model, prompts, list(saes), [0])])
    sums = {layer: 0 for layer in saes}
    for part in parts:  # in batch order, as one process adds them
        for layer, sae in saes.items():
            sums[layer] = sums[layer] + part[layer].to(sae.W_dec.device)
    return {layer: (s / len(prompts))[None] for layer, s in sums.items()}


def _run(ctx, cfg: TraceConfig, progress, workdir) -> TraceResult:
    return trace(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.result("phases"), cfg, progress)


STAGE = Stage("trace", TraceConfig, TraceResult, upstream=("phases",), needs=("evaluate", "saes", "phases"),
              run=_run, printer="print_trace",
              summary="Phase-stratified causal tracing: which SAE features cause each emotion's prediction.")
