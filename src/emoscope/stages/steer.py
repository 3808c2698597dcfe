"""Stage `steer`: choose a feature steering on a small labelled dev set and measure it honestly on
the test set and, unchanged, on other datasets, against the baselines a sceptical reviewer asks for.
`steer(task, saes, evaluation, trace)` returns a `SteerResult` (and its reusable `steering` file).

All methods are scored the same way: calibrated probabilities of the labels' first tokens at the
answer position (`label_probs`). The steering scales each emotion's top causal features (from the
trace stage, ranked by exact effect over all phases) by a strength: first one common strength and
number of features per emotion, then each emotion's own strength (suppression below 1 included) by
coordinate ascent, all chosen by dev macro-F1 (at most `dev_per_class` dev examples per
emotion, drawn from the dev split; the test examples are checked to be disjoint). Baselines, same
splits and the same labelled budget: raw scores, contextual calibration, a prior fitted on the dev
set, the dev examples as few-shot demonstrations, steering along probe directions (class-mean
differences of the residual on the dev set, Tak et al. 2025) with its strength chosen on dev, and
the same number of random SAE features from the same layers (drawn among features active on the dev
set at the answer position, since scaling an inactive feature changes nothing). Side effects: WikiText-2 test
perplexity and next-token KL with the steering applied at every position, and per-emotion recall
changes. For analysis, a dose-response curve of steering toward each emotion (its causal features'
activations raised by multiples of their mean dev activation) beside the same push on random features.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Annotated
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize
from scipy.special import log_softmax

from ..backends.base import require
from ..artifacts import config_hash
from ..data import Example, load_split, select
from .. import distributed as dist
from ..errors import EmoscopeError, validated
from ..hooks import pad_batch, residual_by_layer
from ..interventions.answers import answer_batches, answer_resid
from ..interventions.edits import Edit, apply_edits
from ..interventions.probe import ProbeSteer
from ..interventions.steering import Steering, label_probs, load_steering, make_steering, save_steering
from ..task import PromptBuilder, Task
from ..task.calibrate import CONTENT_FREE, normalize
from ..task.metrics import classification_metrics, macro_f1
from .base import Stage, StageResult
from .evaluate import EvalResult
from .trace import TraceResult
from ..constraints import Finite, NonNegative, Positive, Seed


class SteerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    dev_per_class: int = Field(32, ge=1, le=512)
    """Labelled dev examples per emotion for every choice."""
    features_per_emotion: Annotated[list[Positive], Field(min_length=1)] = [1, 2, 4]
    """Numbers of top causal features per emotion searched."""
    strengths: Annotated[list[NonNegative], Field(min_length=1)] = [1.25, 1.5, 2.0, 3.0, 5.0]
    """Common scale factors searched for all emotions' features (1 = no steering)."""
    per_emotion_strengths: list[NonNegative] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    """Then each emotion's own scale, searched by coordinate ascent on dev from the best common one (below 1
    suppresses; empty: skip)."""
    rounds: int = Field(2, ge=0, le=5)
    """Coordinate-ascent passes over the emotions for per-emotion strengths."""
    dose: list[Finite] = [0.0, 1.0, 2.0, 4.0, 8.0]
    """Push toward each emotion: amounts added to its features, in units of each feature's mean dev activation (empty:
    skip)."""
    transfer: list[str] = ["isear", "dair_emotion"]
    """Datasets evaluated with the steering unchanged (shared labels)."""
    transfer_per_class: int = Field(40, ge=1)
    """Examples per shared label in each transfer dataset."""
    ppl_seqs: int = Field(24, ge=1)
    """WikiText-2 test sequences for perplexity and KL."""
    efficiency_sizes: list[Positive] = [2, 4, 8, 16, 32]
    """Data-efficiency curve: dev examples per emotion the search and the baselines are rerun on (sizes above
    dev_per_class are skipped; empty: no curve)."""
    efficiency_seeds: int = Field(3, ge=1, le=20)
    """Dev subsets drawn per size for the data-efficiency curve."""
    n_boot: int = Field(1000, ge=100)
    """Bootstrap resamples for intervals."""
    seed: Seed = 0
    """Seed for dev sampling, random features and the bootstrap."""


class SteerResult(StageResult):
    """The chosen steering (`steering`, a reusable file) and every method's test and transfer scores
    (`to_frame()`)."""

    stage = "steer"

    def __init__(self, data: dict, tables=None, timing=None, steering: Steering | None = None):
        super().__init__(data, tables, timing)
        self.steering = steering

    def to_frame(self) -> pd.DataFrame:
        """Per method and dataset: accuracy and macro-F1 with their intervals."""
        rows = []
        for method, sets in self.data["methods"].items():
            for ds, m in sets.items():
                rows.append({"method": method, "dataset": ds, **{f"{k}{s}": m[k][v] for k in ("accuracy", "macro_f1")
                                                                 for s, v in (("", "value"), ("_lo", "lo"),
                                                                              ("_hi", "hi"))}})
        return pd.DataFrame(rows)

    def _write(self, folder: Path) -> None:
        super()._write(folder)
        save_steering(self.steering, folder / "steering.json")

    @classmethod
    def load(cls, folder: str | Path) -> "SteerResult":
        res = super().load(folder)
        res.steering = load_steering(Path(folder) / "steering.json")
        return res


@dataclass
class _Dev:
    """The labelled dev set every choice is made on, and its prompts' cached answer passes."""
    examples: list[Example]
    y: np.ndarray
    answers: list
    prior_answers: list  # the content-free prompts' (calibration), shared by every steered pass

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]


def steer(task: Task, saes: dict, evaluation: EvalResult, trace: TraceResult,
          config: SteerConfig | dict | None = None, progress=None) -> SteerResult:
    """Choose a steering of the traced features on dev; score it and six baselines on the test examples
    and on other datasets; measure its side effects and a dose-response toward each emotion."""
    cfg = config if isinstance(config, SteerConfig) else validated(SteerConfig, config or {}, "steer.")
    require(task.model, "steer")
    view, labels, test = task.model, evaluation.labels, evaluation.predictions
    saes = residual_by_layer(saes, "steer")
    dev = _dev_set(task, labels, cfg, set(test.id))
    ranked = {lab: sorted((f for p in e["phases"].values() for f in p["features"]), key=lambda f: -f["effect"]["value"])
              for lab, e in trace["emotions"].items()}

    def edits_for(n: int, s: float | dict) -> list[Edit]:
        out = []
        for lab in labels:
            v = s.get(lab, 1.0) if isinstance(s, dict) else s
            for f in [f for f in ranked.get(lab, []) if f["effect"]["value"] > 0][:n]:
                if v != 1.0:
                    out.append(Edit(layer=f["layer"], feature=f["feature"], mode="scale", value=v))
        return out

    best, curve = _search(task, saes, dev, labels, ranked, edits_for, cfg, progress)
    chosen = edits_for(best["features_per_emotion"], best["strengths"])
    if not chosen:
        raise EmoscopeError("the dev search chose no steering at all (every strength 1): nothing to apply")
    sc = _Scorer(task, dev)  # the test prompts run once for every method and the data-efficiency curve
    sc.keep.add((task.builder, tuple(test.text)))
    methods = _methods(task, saes, chosen, dev, labels, cfg, sc)
    y_test = np.array([labels.index(g) for g in test.gold])
    results = {name: {"test": classification_metrics(y_test, fn(list(test.text)).argmax(1), labels, cfg.n_boot,
                                                     cfg.seed)}
               for name, fn in methods.items()}
    transfer_errors = _transfer(task, methods, labels, cfg, results)
    efficiency = _efficiency(task, saes, sc, list(test.text), y_test, labels, ranked, edits_for, cfg, progress)
    dose = _dose_response(task, dev, saes, ranked, labels, best["features_per_emotion"], cfg, progress)
    side = _side_effects(task, saes, chosen, cfg)
    d = task.config.data
    steering = make_steering(view, saes, chosen, {"run_dir": None, "dataset": d.dataset, "split": "dev",
                                                   "dev_ids": [e.id for e in dev.examples], "search": curve,
                                                   "seed": cfg.seed})
    summary = {name: {k: {"accuracy": v["accuracy"], "macro_f1": v["macro_f1"]} for k, v in r.items()}
               for name, r in results.items()}
    data = {"stage": "steer", "config_hash": config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
            "model": view.name, "labels": labels, "n_dev": len(dev.examples), "n_test": int(len(test)),
            "seed": cfg.seed,
            "search": curve, "chosen": best, "n_features": len(chosen), "methods": summary,
            "recall_change_vs_contextual": {
                lab: results["feature_steering"]["test"]["per_class"][lab]["recall"]["value"]
                - results["contextual_calibration"]["test"]["per_class"][lab]["recall"]["value"] for lab in labels},
            "side_effects": side, "dose_response": dose, "transfer_errors": transfer_errors,
            "data_efficiency": efficiency}
    return SteerResult(data, steering=steering)


def _dev_set(task: Task, labels: list[str], cfg: SteerConfig, test_ids: set) -> _Dev:
    """At most `dev_per_class` dev-split examples per emotion (seeded), disjoint from the test examples."""
    pool = task.examples("dev", per_class=None)
    rng = random.Random(cfg.seed)
    dev = []
    for lab in labels:
        rows = sorted((e for e in pool if e.label == lab), key=lambda e: e.id)
        rng.shuffle(rows)
        dev += rows[:cfg.dev_per_class]
    if not dev:
        raise EmoscopeError(f"the dev split of {task.config.data.dataset} has no examples of {labels}: "
                            "steering needs a labelled dev set")
    overlap = test_ids & {e.id for e in dev}
    if overlap:
        raise EmoscopeError(f"{len(overlap)} test examples are also in the dev set: refusing to choose a steering on "
                            "them")
    with torch.no_grad():  # the dev prompts' tokens before the answer run once for the whole search
        answers = answer_batches(task.model, task.encode_all(e.text for e in dev))
        prior_answers = answer_batches(task.model, task.encode_all(CONTENT_FREE))
    return _Dev(dev, np.array([labels.index(e.label) for e in dev]), answers, prior_answers)


def _search(task, saes, dev: _Dev, labels, ranked, edits_for, cfg, progress) -> tuple[dict, list]:
    """The best common (number of features, strength) on dev macro-F1, then each emotion's own strength."""
    def macro(probs):
        return classification_metrics(dev.y, probs.argmax(1), labels, 100)["macro_f1"]["value"]

    def probs_for(edits):
        return label_probs(task, dev.texts, saes, edits, answers=dev.answers, prior_answers=dev.prior_answers)

    curve = []
    for n in cfg.features_per_emotion:
        for s in cfg.strengths:
            ed = edits_for(n, s)
            if not ed:
                continue
            p = probs_for(ed)
            if not np.isfinite(p).all():
                continue
            curve.append({"features_per_emotion": n, "strength": s, "dev_macro_f1": macro(p)})
            if progress:
                progress(1)
    if not curve:
        raise EmoscopeError("no usable steering: tracing found no feature with a positive effect")
    best = dict(max(curve, key=lambda c: c["dev_macro_f1"]))
    best["strengths"], best["dev_macro_f1"] = _per_emotion(
        lambda st: probs_for(edits_for(best["features_per_emotion"], st)), macro,
        [lab for lab in labels if ranked.get(lab)], best, cfg, curve, progress)
    return best, curve


def _transfer(task, methods, labels, cfg, results) -> dict:
    """Every method, unchanged, on the test split of other datasets (their shared labels only)."""
    errors = {}
    for ds in cfg.transfer:
        try:
            rows, rp = load_split(ds, "test", task.config.data.data_dir)
        except EmoscopeError as e:
            errors[ds] = str(e)
            continue
        shared = [lab for lab in labels if any(r.label == lab for r in rows)]
        ex = select(rows, shared, rp, "drop", cfg.transfer_per_class, cfg.seed, "test")
        y = np.array([labels.index(e.label) for e in ex])
        present = [labels.index(lab) for lab in shared]
        for name, fn in methods.items():
            probs = fn([e.text for e in ex])
            pred = np.array(present)[probs[:, present].argmax(1)]  # choose among the dataset's labels
            results[name][ds] = classification_metrics(np.searchsorted(present, y), np.searchsorted(present, pred),
                                                       shared, cfg.n_boot, cfg.seed)
    return errors


def _resid(task: Task, answers, layers: list[int]) -> dict[int, np.ndarray]:
    """Residual stream at the answer position, [n, d] per requested layer, from prompts' cached answer
    passes (this rank's; gathered)."""
    parts = dist.gather(lambda: [{layer: r[layer].cpu().numpy() for layer in layers}
                                 for r in answer_resid(task.model, answers, layers, task.label_tokens)])
    return {layer: np.concatenate([p[layer] for p in parts]) for layer in layers}


def _per_emotion(probs_for, score, labels, best, cfg, curve, progress) -> tuple[dict[str, float], float]:
    """Coordinate ascent on dev macro-F1 over each emotion's strength, from the best common strength;
    a change is kept only when it strictly improves dev. Every point tried joins the search curve."""
    st = {lab: best["strength"] for lab in labels}
    top = best["dev_macro_f1"]
    for _ in range(cfg.rounds if cfg.per_emotion_strengths else 0):
        moved = False
        for lab in labels:
            for v in cfg.per_emotion_strengths:
                if v == st[lab]:
                    continue
                trial = {**st, lab: v}
                p = probs_for(trial)
                if not np.isfinite(p).all():
                    continue
                f1 = score(p)
                curve.append({"features_per_emotion": best["features_per_emotion"], "strengths": trial,
                              "dev_macro_f1": f1})
                if progress:
                    progress(1)
                if f1 > top + 1e-12:
                    st, top, moved = trial, f1, True
        if not moved:
            break
    return st, top


def _content_free_prior(logp: np.ndarray) -> np.ndarray:
    """The mean label distribution over content-free inputs, in log space."""
    return np.log(np.exp(normalize(logp)).mean(0))


def _dev_prior_fit(logp: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-label bias b minimising dev cross-entropy of softmax(log p + b) (calibration fitted on dev)."""
    def loss(b):
        z = log_softmax(logp + b, axis=1)
        return -z[np.arange(len(y)), y].mean() + 1e-3 * (b ** 2).sum()
    return minimize(loss, np.zeros(logp.shape[1]), method="L-BFGS-B").x


class _Scorer:
    """Label log-probs at the answer position for any prompt builder and hook, with each text list's
    tokens before the answer run once and shared by every method that reads it (the last few kept)."""

    def __init__(self, task: Task, dev: _Dev):
        self.task, self.dev = task, dev
        self.memo: dict = {(task.builder, tuple(dev.texts)): dev.answers}  # the search ran the dev prefixes
        self.keep: set = set()  # keys never dropped (the test prompts, across the data-efficiency curve)

    def batches(self, ts, builder=None):
        builder = builder or self.task.builder
        key = (builder, tuple(ts))  # the builder itself: an id could be reused once it is freed
        if key not in self.memo:
            if len(self.memo) >= 4 + len(self.keep):
                self.memo.pop(next(k for k in self.memo if k not in self.keep))
            with torch.no_grad():
                self.memo[key] = answer_batches(self.task.model, [builder.encode(builder.prompt(t)) for t in ts])
        return self.memo[key]

    def raw_logp(self, ts, builder=None, ctx=None) -> np.ndarray:
        def one(b):
            with torch.no_grad(), (ctx(b.last) if ctx else contextlib.nullcontext()):
                logits, _ = b.logits(self.task.model, self.task.label_tokens)
            return torch.log_softmax(logits, -1).double().cpu().numpy()
        return np.concatenate(dist.gather(lambda: [one(b) for b in self.batches(ts, builder)]))

    def calibrated(self, ts, ctx=None, builder=None) -> np.ndarray:
        lp = self.raw_logp(ts, builder, ctx)
        prior = _content_free_prior(self.raw_logp(CONTENT_FREE, builder, ctx))
        return np.exp(normalize(normalize(lp) - prior))


def _methods(task: Task, saes, chosen, dev: _Dev, labels, cfg, sc: "_Scorer | None" = None) -> dict:
    """Every method as texts -> calibrated label probabilities [n, K] (`sc`: a scorer whose cached prompts to
    reuse)."""
    view, sc = task.model, sc or _Scorer(task, dev)
    sc.memo[(task.builder, tuple(dev.texts))] = dev.answers
    bias = _dev_prior_fit(sc.raw_logp(dev.texts), dev.y)
    rng = np.random.default_rng(cfg.seed + 5)
    k, n = len(labels), len(dev.examples)
    demos = [dev.examples[i] for i in sorted(rng.choice(n, min(k, n), replace=False))]
    few = PromptBuilder(view.tokenizer, task.builder.t, labels, demos, task.builder.chat, view.max_context)
    few_prior = _content_free_prior(sc.raw_logp(CONTENT_FREE, few))
    # probe steering: class-mean directions at the layer the features mostly come from
    layer = max(set(e.layer for e in chosen), key=[e.layer for e in chosen].count)
    resid = _resid(task, dev.answers, sorted({e.layer for e in chosen} | {layer}))
    probe = ProbeSteer(layer, resid[layer], dev.y)
    alpha = _probe_strength(sc, probe, dev, labels, cfg)
    random_edits = _random_edits(saes, resid, chosen, rng)
    return {
        "raw": lambda ts: np.exp(normalize(sc.raw_logp(ts))),
        "contextual_calibration": lambda ts: sc.calibrated(ts),
        "dev_fitted_calibration": lambda ts: np.exp(normalize(sc.raw_logp(ts) + bias)),
        "few_shot_dev_demos": lambda ts: np.exp(normalize(normalize(sc.raw_logp(ts, few)) - few_prior)),
        "probe_steering": lambda ts: sc.calibrated(ts, lambda last: probe.context(view, alpha, last)),
        "random_features": lambda ts: label_probs(task, ts, saes, random_edits, answers=sc.batches(ts),
                                                  prior_answers=dev.prior_answers),
        "feature_steering": lambda ts: label_probs(task, ts, saes, chosen, answers=sc.batches(ts),
                                                   prior_answers=dev.prior_answers),
    }


EFFICIENCY_METHODS = ("feature_steering", "dev_fitted_calibration", "probe_steering", "few_shot_dev_demos")


def _efficiency(task, saes, sc: "_Scorer", test_texts, y_test, labels, ranked, edits_for, cfg, progress) -> dict:
    """The data-efficiency curve: feature steering and three baselines chosen on m dev examples per emotion
    (`efficiency_seeds` stratified subsets of the dev set per size), scored on the test set. Per size and method:
    the mean test macro-F1 over subsets, its 95% interval (test examples resampled, the mean over subsets taken
    in each resample) and the spread over subsets. The steering search here is the common (features, strength)
    one; the few-shot baseline shows as many demonstrations as there are labels, drawn from the subset."""
    sizes = [m for m in cfg.efficiency_sizes if m <= cfg.dev_per_class]
    if not sizes:
        return {}
    common = cfg.model_copy(update={"per_emotion_strengths": []})
    dev = sc.dev
    preds = {name: {m: [] for m in sizes} for name in EFFICIENCY_METHODS}
    for m in sizes:
        for s in range(cfg.efficiency_seeds):
            sub = _subset(task, dev, m, cfg.seed * 1000 + 17 * m + s)
            best, _ = _search(task, saes, sub, labels, ranked, edits_for, common, None)
            methods = _methods(task, saes, edits_for(best["features_per_emotion"], best["strengths"]), sub, labels,
                               common, sc)
            for name in EFFICIENCY_METHODS:
                preds[name][m].append(methods[name](test_texts).argmax(1))
            sc.memo = {k: v for k, v in sc.memo.items() if k in sc.keep}  # this subset's prompt caches: done
            if progress:
                progress(1)
    rng = np.random.default_rng(cfg.seed + 11)
    boots = rng.integers(0, len(y_test), (cfg.n_boot, len(y_test)))
    return {"sizes": sizes, "seeds": cfg.efficiency_seeds, "n_test": int(len(y_test)),
            "methods": {name: [{"per_emotion": m, **_mean_over_subsets(y_test, preds[name][m], len(labels), boots)}
                               for m in sizes] for name in EFFICIENCY_METHODS}}


def _subset(task, dev: _Dev, m: int, seed: int) -> _Dev:
    """m dev examples per emotion (all where fewer), seeded, with their prompts' answer passes."""
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(dev.y == e))[:m] for e in np.unique(dev.y)]))
    examples = [dev.examples[i] for i in idx]
    with torch.no_grad():
        answers = answer_batches(task.model, task.encode_all(e.text for e in examples))
    return _Dev(examples, dev.y[idx], answers, dev.prior_answers)


def _mean_over_subsets(y: np.ndarray, preds: list[np.ndarray], k: int, boots: np.ndarray) -> dict:
    per = [macro_f1(y, p, k) for p in preds]
    resampled = np.mean([macro_f1(y, p, k, boots) for p in preds], axis=0)  # the mean over subsets, per resample
    return {"macro_f1": float(np.mean(per)), "lo": float(np.percentile(resampled, 2.5)),
            "hi": float(np.percentile(resampled, 97.5)), "sd_over_subsets": float(np.std(per)), "n_subsets": len(per)}


def _probe_strength(sc: _Scorer, probe: ProbeSteer, dev: _Dev, labels, cfg) -> float:
    """The probe steering's strength with the best dev macro-F1 (calibrated as it runs)."""
    best_alpha, best_f1 = 1.0, -1.0
    for a in cfg.strengths:
        def ctx(last, a=a):
            return probe.context(sc.task.model, a, last)
        lp = sc.raw_logp(dev.texts, ctx=ctx)
        prior = _content_free_prior(sc.raw_logp(CONTENT_FREE, ctx=ctx))
        f1 = classification_metrics(dev.y, (normalize(lp) - prior).argmax(1), labels, 100)["macro_f1"]["value"]
        if f1 > best_f1:
            best_alpha, best_f1 = a, f1
    return best_alpha


def _random_edits(saes, resid, chosen: list[Edit], rng) -> list[Edit]:
    """Control: as many random features from the same layers, drawn among those active on the dev set at
    the answer position (scaling an inactive feature is a no-op, which would flatter the steering)."""
    active = {layer: np.flatnonzero((saes[layer].encode(torch.from_numpy(resid[layer]).to(saes[layer].W_dec)) > 0)
                                    .any(0).cpu().numpy())
              for layer in {e.layer for e in chosen}}
    out = []
    for e in chosen:
        pool = np.setdiff1d(active[e.layer], [c.feature for c in chosen if c.layer == e.layer])
        if len(pool):
            out.append(Edit(layer=e.layer, feature=int(rng.choice(pool)), mode="scale", value=e.value))
    return out


def _dose_response(task: Task, dev: _Dev, saes, ranked, labels, n, cfg, progress) -> dict:
    """Steering toward a target emotion, for analysis: add alpha x (the feature's mean activation where
    active on dev) to each of the emotion's top-n causal features at the answer position; the share of
    dev examples of *other* emotions then predicted as the target (calibrated with the unsteered prior,
    which the same push on the content-free inputs would otherwise cancel), beside the same push on as
    many random features of the same layers that are active on dev (seeded)."""
    dev_texts, dev_answers, y_dev = dev.texts, dev.answers, dev.y
    feats = {lab: [(f["layer"], f["feature"]) for f in ranked.get(lab, []) if f["effect"]["value"] > 0][:n]
             for lab in labels}
    layers = sorted({layer for fs in feats.values() for layer, _ in fs})
    if not cfg.dose or not layers:
        return {}
    resid = _resid(task, dev_answers, layers)
    codes = {layer: saes[layer].encode(torch.from_numpy(resid[layer]).to(saes[layer].W_dec)).detach().cpu().numpy()
             for layer in layers}
    unit = {layer: np.where((codes[layer] > 0).any(0),
                            codes[layer].sum(0) / np.maximum((codes[layer] > 0).sum(0), 1), 0.0) for layer in layers}
    rng = np.random.default_rng(cfg.seed + 11)
    out = {}
    for e, lab in enumerate(labels):
        if not feats[lab]:
            continue
        rand = []
        for layer, _ in feats[lab]:
            pool = np.setdiff1d(np.flatnonzero(unit[layer] > 0), [f for fl, f in feats[lab] if fl == layer])
            if len(pool):
                rand.append((layer, int(rng.choice(pool))))
        other = y_dev != e
        curve = []
        for a in cfg.dose:
            row = {"strength": a}
            p = None
            for name, fs in (("target", feats[lab]), ("random", rand)):
                if p is None or a != 0:  # at strength 0 both pushes are the same unsteered pass
                    ed = [Edit(layer=layer, feature=f, mode="add", value=float(a * unit[layer][f])) for layer, f in fs]
                    p = label_probs(task, dev_texts, saes, ed, answers=dev_answers, steer_prior=False,
                                    prior_answers=dev.prior_answers)
                ok = np.isfinite(p).all(1) & other
                row[f"{name}_pushed"] = float((p[ok].argmax(1) == e).mean()) if ok.any() else None
                row[f"{name}_prob"] = float(p[ok, e].mean()) if ok.any() else None
            curve.append(row)
            if progress:
                progress(1)
        out[lab] = {"features": [list(f) for f in feats[lab]], "random_features": [list(f) for f in rand],
                    "n_other": int(other.sum()), "curve": curve}
    return out


def _side_effects(task: Task, saes, chosen, cfg) -> dict:
    """WikiText-2 test perplexity and mean next-token KL(clean || steered), steering at every position."""
    import torch.nn.functional as F

    from ..sae.corpus import wikitext

    view = task.model
    tok = view.tokenizer
    paras = [p for p in wikitext("test", task.config.data.data_dir) if len(p) > 200][:cfg.ppl_seqs]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id] else []
    seqs = [(bos + tok(p, add_special_tokens=False).input_ids)[:128] for p in paras]
    nll = {"clean": 0.0, "steered": 0.0}
    kl, n = 0.0, 0
    for i in range(0, len(seqs), 4):
        ids, mask = pad_batch(seqs[i:i + 4], view.device)
        with torch.no_grad():
            clean = view.model(input_ids=ids, attention_mask=mask).logits.float()
            with apply_edits(view, saes, chosen, None):
                steered = view.model(input_ids=ids, attention_mask=mask).logits.float()
        valid = mask[:, 1:].bool()
        tgt = ids[:, 1:]
        for name, lg in (("clean", clean), ("steered", steered)):
            ce = F.cross_entropy(lg[:, :-1].transpose(1, 2), tgt, reduction="none")
            nll[name] += float(ce[valid].sum())
        lc, ls = F.log_softmax(clean[:, :-1], -1), F.log_softmax(steered[:, :-1], -1)
        kl += float((lc.exp() * (lc - ls)).sum(-1)[valid].sum())
        n += int(valid.sum())
    ppl_c, ppl_s = np.exp(nll["clean"] / n), np.exp(nll["steered"] / n)
    return {"tokens": n, "ppl_clean": float(ppl_c), "ppl_steered_all_positions": float(ppl_s),
            "ppl_change": float(ppl_s / ppl_c - 1), "kl_all_positions": kl / n,
            "answer_position_only": "changes only the answer position's residual; earlier tokens' predictions are "
                                    "untouched by construction"}


def _run(ctx, cfg: SteerConfig, progress, workdir) -> SteerResult:
    res = steer(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.result("trace"), cfg, progress)
    res.steering.chosen_on["run_dir"] = str(ctx.run_dir)
    return res


STAGE = Stage("steer", SteerConfig, SteerResult, upstream=("trace",), needs=("evaluate", "saes", "trace"),
              run=_run, printer="print_steer",
              summary="Choose a feature steering on the dev set; compare it with baselines on test and other datasets.")
