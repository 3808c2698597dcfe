"""The reference: what the audit measures once on the model it validates, and the verdict every check applies.

`Reference.measure(task, saes, evaluation, phases, trace, config)` observes the reference model on the evaluated
examples once: its calibrated label log-probs, predictions, answer-position residuals and SAE codes (an
`Observation`), its causal sets' ablation effects, the drift between unrelated examples per layer and the bootstrap
draws. `reference.observe(task, texts)` observes a candidate's task the same way, and `reference.row(candidate,
observation, info)` compares the two into an `AuditRow`, gated by `Thresholds.verdict` — the one verdict the
audit, layer sensitivity (whose rows are audit rows) and the canary (on its estimates) apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict

import numpy as np
import torch

from ..analysis.drift import auroc_or_none, derangement, jaccard_topk, phase_drift, retained, rowcorr
from ..errors import EmoscopeError
from .candidates import Candidate
from .config import AuditConfig, Thresholds  # noqa: F401  (Thresholds: read from here by the canary)
from ..hooks import residual_by_layer
from ..interventions.answers import first_token_prior
from ..task import Task, calibrate
from ..task.metrics import classification_metrics



def margins(cal: np.ndarray, top: np.ndarray | None = None) -> np.ndarray:
    """Per row, the log-prob of label `top` (default: the row's best) minus the best other label's."""
    top = cal.argmax(1) if top is None else top
    others = cal.copy()
    others[np.arange(len(top)), top] = -np.inf
    return cal[np.arange(len(top)), top] - others.max(1)


class Observation(NamedTuple):
    """A model's answers and features on the audited examples."""
    prompts: list[list[int]]
    """The prompts' token ids."""
    logp: np.ndarray
    """[n, K] summed log-probs of each label."""
    cal: np.ndarray
    """[n, K] calibrated log-probs (a non-finite row: uniform)."""
    pred: np.ndarray
    """[n] predicted label index."""
    non_finite: np.ndarray
    """[n] whether the row overflowed (a float16 candidate can)."""
    resid: dict[int, np.ndarray]
    """Per SAE layer, the answer-position residuals [n, d]."""
    codes: dict[int, np.ndarray]
    """Per SAE layer, the SAE codes of those residuals [n, d_sae]."""
    effects: dict[str, np.ndarray]
    """Per emotion, the drop in its best-other margin when its causal set is zeroed, on its ablation examples."""


def observe(task: Task, texts: list[str], saes: dict) -> Observation:
    """Calibrated predictions and probabilities, and SAE codes at the answer position of every layer (no effects)."""
    prompts = task.encode_all(texts)
    # the label scores and every SAE layer's answer-position residual from the same forwards
    logp, res = task.model.score_ids(prompts, task.label_ids, task.config.batch_size, resid_layers=list(saes))
    cal = calibrate.apply_prior(logp, task.log_prior())
    with torch.no_grad():
        codes = {layer: np.nan_to_num(sae.encode(torch.from_numpy(res[layer]).to(sae.W_dec)).cpu().numpy(), nan=0.0,
                                      posinf=0.0, neginf=0.0) for layer, sae in saes.items()}
    # a candidate can overflow (Gemma in float16 does): such rows count as maximally uncertain and wrong
    bad = ~np.isfinite(cal).all(1)
    cal = np.where(bad[:, None], -np.log(cal.shape[1]), cal)
    return Observation(prompts, logp, cal, cal.argmax(1), bad, res, codes, {})


def ablation_effects(task: Task, texts, saes, causal, labels, idx) -> dict[str, np.ndarray]:
    """Per emotion: the drop in its calibrated best-other margin on its chosen examples when its causal
    set is zeroed at the answer position (SAE error kept). Non-finite margins (an overflowing
    candidate) count as no effect."""
    prior = first_token_prior(task)
    feats = {}
    for lab in labels:
        for layer, f in causal.get(lab, []):
            if layer in saes and len(idx[lab]):
                feats.setdefault(lab, {}).setdefault(int(layer), []).append(int(f))
    if not feats:
        return {}
    # every emotion's examples in one set of answer passes (one prefix run); each emotion's set is ablated
    # on all of them and read on its own rows
    rows, order = {}, []
    for lab in feats:
        rows[lab] = slice(len(order), len(order) + len(idx[lab]))
        order += list(idx[lab])
    prompts = task.encode_all(texts[i] for i in order)
    gold = np.concatenate([np.full(len(idx[lab]), labels.index(lab)) for lab in feats])
    sets = [{}] + list(feats.values())  # the clean pass and every emotion's ablation, in one call
    try:
        m = task.model.ablate_each(saes, prompts, gold, task.label_tokens, sets, prior)
    except EmoscopeError:  # non-finite activations: the candidate overflows
        m = np.full((len(sets), len(prompts)), np.nan)
    return {lab: np.nan_to_num(m[0, rows[lab]] - m[j, rows[lab]], nan=0.0, posinf=0.0, neginf=0.0)
            for j, lab in enumerate(feats, 1)}


class AuditRow(TypedDict, total=False):
    """One candidate compared with the reference (a row of the audit's result.json)."""
    name: str
    changed: dict[str, Any]  # the candidate's settings beside its name
    weights: str | None  # what the weights are (a file, a precision, a library's kernels)
    accuracy: float
    non_finite_frac: float
    accuracy_change: dict[str, float]  # value, lo, hi (paired bootstrap, 95%)
    macro_f1_change: float
    flip_rate: float
    recall_change: dict[str, float]
    drift: dict[str, dict]  # per layer: corr, jaccard, normalized, phase
    drift_by_phase: dict[str, float]
    drift_by_phase_raw: dict[str, float]
    final_phase_excess: dict | None
    final_phase_drifts_most: bool
    causal_survival: float | None
    label_logp_max_change: float | None
    resid_rel_change: dict[str, float] | None
    causal_effect: dict | None  # value, lo, hi: the share of the reference's ablation effect retained
    detection_auroc: dict[str, float | None]
    failed: bool
    parity: dict  # llama.cpp rows: the parity row's flips and changes beside their own
    file_bytes: int  # llama.cpp rows: the file's size
    kld: dict | None  # llama-perplexity's statistics against the reference in the same runtime (audit.kld set)


@dataclass
class Reference:
    """The reference every candidate is compared with, observed once, and what the comparison needs."""
    task: Task
    saes: dict  # layer -> SAE (resid_post)
    cfg: AuditConfig
    texts: list[str]
    y: np.ndarray
    labels: list[str]
    obs: Observation
    causal: dict[str, list[list[int]]]
    phase_of: dict[int, int]
    n_phases: int
    boots: np.ndarray
    unrelated: dict[int, float]
    abl_idx: dict[str, np.ndarray]
    kld_bases: dict = field(default_factory=dict)  # runtime -> kld.Base: the reference's stored next-token log-probs

    @classmethod
    def measure(cls, task: Task, saes: dict, evaluation, phases, trace, cfg: AuditConfig) -> Reference:
        """Observe the reference task on the evaluated examples, with its causal sets' effects."""
        preds, labels = evaluation.predictions, evaluation.labels
        texts, y = list(preds.text), np.array([labels.index(g) for g in preds.gold])
        by_layer = residual_by_layer(saes, "audit")
        phase_of = phases.phase_of_layer if phases is not None else {}
        n_phases = max(phase_of.values()) + 1 if phase_of else 1
        causal = (_checked_features(cfg.causal_features, labels, by_layer) if cfg.causal_features
                  else _causal_sets(trace, phases))
        obs = observe(task, texts, by_layer)
        pick = np.random.default_rng(cfg.seed + 2)
        abl_idx = {lab: np.sort(pick.permutation(np.flatnonzero(y == e))[:cfg.ablation_per_emotion])
                   for e, lab in enumerate(labels)}
        obs = obs._replace(effects=ablation_effects(task, texts, by_layer, causal, labels, abl_idx))
        # drift baseline per layer: 1 - top-k Jaccard between each reference example and another one. Layers
        # differ in how example-specific their codes are, so raw drift grows with depth for any change;
        # drift / unrelated is the fraction of the way to an unrelated input.
        order = derangement(len(texts), cfg.seed + 1)
        unrelated = {layer: float(1 - jaccard_topk(obs.codes[layer], obs.codes[layer][order], cfg.top_k).mean())
                     for layer in by_layer}
        boots = np.random.default_rng(cfg.seed).integers(0, len(y), (cfg.n_boot, len(y)))
        return cls(task, by_layer, cfg, texts, y, labels, obs, causal, phase_of, n_phases, boots, unrelated, abl_idx)

    @property
    def accuracy(self) -> float:
        """The reference's calibrated accuracy on the audited examples."""
        return float((self.obs.pred == self.y).mean())

    def observe(self, task: Task, texts: list[str]) -> Observation:
        """A candidate's task observed as the reference was, with its causal sets' effects on the same examples."""
        cur = observe(task, texts, self.saes)
        return cur._replace(effects=ablation_effects(task, texts, self.saes, self.causal, self.labels, self.abl_idx))

    def row(self, cand: Candidate, cur: Observation, info: dict) -> AuditRow:
        """The candidate's row: accuracy and flips, drift, causal survival and effect retained, detection, failed."""
        cur = cur._replace(pred=np.where(cur.non_finite, (self.y + 1) % len(self.labels), cur.pred))  # never gold
        acc = self._accuracy(cur)
        survival, fdrift, total = self._survival(cur)
        effect = retained(self.obs.effects, cur.effects, np.random.default_rng(self.cfg.seed + 3), self.cfg.n_boot)
        flipped = self.obs.pred != cur.pred
        broken = self.cfg.thresholds.verdict(acc["accuracy_change"]["value"], float(flipped.mean()), survival,
                                             None if effect is None else effect["value"], bool(cur.non_finite.any()))
        changed = cand.model_dump(mode="json", exclude_none=True, exclude={"name"})
        return {"name": cand.name, "changed": changed, **info, **acc, **self._drift(cur), "causal_survival": survival,
                "label_logp_max_change": self._logp_change(cur), "resid_rel_change": self._resid_change(cur),
                "causal_effect": effect, "detection_auroc": self._detection(cur, flipped, fdrift if total else None),
                "failed": bool(broken)}

    def _logp_change(self, cur: Observation) -> float | None:
        """Largest change of any label's summed log-prob on any example (None when the texts differ)."""
        d = np.abs(cur.logp - self.obs.logp)
        return float(d[np.isfinite(d)].max()) if cur.prompts == self.obs.prompts and np.isfinite(d).any() else None

    def _resid_change(self, cur: Observation) -> dict[str, float] | None:
        """Per SAE layer, ||candidate - reference|| / ||reference|| of the answer-position residuals over all
        examples (None when the prompts differ)."""
        if cur.prompts != self.obs.prompts:
            return None
        return {str(layer): float(np.linalg.norm(np.nan_to_num(cur.resid[layer] - r)) / max(np.linalg.norm(r), 1e-12))
                for layer, r in self.obs.resid.items()}

    def _accuracy(self, cur: Observation) -> dict:
        """Accuracy and its change with a paired bootstrap interval, macro-F1 change, flips, recall changes."""
        y, labels, ref = self.y, self.labels, self.obs
        acc_r, acc_c = (ref.pred == y), (cur.pred == y)
        boot_d = acc_c[self.boots].mean(1) - acc_r[self.boots].mean(1)
        m_r = classification_metrics(y, ref.pred, labels, 200)
        m_c = classification_metrics(y, cur.pred, labels, 200)
        return {"accuracy": float(acc_c.mean()), "non_finite_frac": float(cur.non_finite.mean()),
                "accuracy_change": {"value": float(acc_c.mean() - acc_r.mean()),
                                    "lo": float(np.percentile(boot_d, 2.5)), "hi": float(np.percentile(boot_d, 97.5))},
                "macro_f1_change": m_c["macro_f1"]["value"] - m_r["macro_f1"]["value"],
                "flip_rate": float((ref.pred != cur.pred).mean()),
                "recall_change": {lab: m_c["per_class"][lab]["recall"]["value"]
                                  - m_r["per_class"][lab]["recall"]["value"] for lab in labels}}

    def _drift(self, cur: Observation) -> dict:
        """Feature drift per layer (raw and normalised by unrelated-input drift), per phase, final phase's excess."""
        drift, per_ex = {}, {}
        for layer in sorted(self.saes):
            a, b = self.obs.codes[layer], cur.codes[layer]
            per_ex[layer] = 1 - jaccard_topk(a, b, self.cfg.top_k)
            jac = float(1 - per_ex[layer].mean())
            u = self.unrelated[layer]
            drift[layer] = {"corr": float(rowcorr(a, b).mean()), "jaccard": jac,
                            "normalized": (1 - jac) / u if u > 0 else (0.0 if jac == 1 else None),
                            "phase": int(self.phase_of.get(layer, 0))}
        by_phase_raw = {p: float(np.mean([1 - d["jaccard"] for d in drift.values() if d["phase"] == p] or [np.nan]))
                        for p in range(self.n_phases)}
        by_phase, excess = phase_drift(per_ex, self.unrelated, {layer: d["phase"] for layer, d in drift.items()},
                                       self.n_phases, self.boots)
        return {"drift": {str(layer): d for layer, d in drift.items()},
                "drift_by_phase": {str(p): v for p, v in by_phase.items()},
                "drift_by_phase_raw": {str(p): v for p, v in by_phase_raw.items()},
                "final_phase_excess": excess,
                "final_phase_drifts_most": bool(excess is not None and excess["value"] >= 0)}

    def _survival(self, cur: Observation) -> tuple[float | None, np.ndarray, int]:
        """Share of the reference's causal features still active where they were active, and each example's
        causal-feature drift score."""
        alive, total, fdrift = 0, 0, np.zeros(len(self.y))
        for e, lab in enumerate(self.labels):
            feats = self.causal.get(lab, [])
            idx = np.flatnonzero(self.y == e)
            for layer, f in feats:
                if layer not in self.saes:
                    continue
                a, b = self.obs.codes[layer][idx, f], cur.codes[layer][idx, f]
                on = a > 0
                total += int(on.sum())
                alive += int((b > 0)[on].sum())
                fdrift[idx] += np.abs(a - b) / (np.abs(a) + 1e-6) / max(len(feats), 1)
        return (alive / total if total else None), fdrift, total

    def _detection(self, cur: Observation, flipped: np.ndarray, fdrift: np.ndarray | None) -> dict:
        """AUROC with which output-side signals, and causal-feature drift, flag the flipped examples."""
        rc, cc = self.obs.cal, cur.cal

        def ent(c):
            return -(np.exp(c) * c).sum(1)
        return {"confidence_drop": auroc_or_none(rc.max(1) - cc.max(1), flipped),
                "entropy_rise": auroc_or_none(ent(cc) - ent(rc), flipped),
                "margin_drop": auroc_or_none(margins(rc) - margins(cc), flipped),
                "causal_feature_drift": auroc_or_none(fdrift, flipped) if fdrift is not None else None}


def _checked_features(features: dict, labels: list[str], saes: dict) -> dict[str, list[list[int]]]:
    """audit.causal_features as given, refused unless every emotion, layer and feature exists here."""
    for lab, pairs in features.items():
        if lab not in labels:
            raise EmoscopeError(f"audit.causal_features: unknown emotion '{lab}' "
                                f"(the task's labels: {', '.join(labels)})")
        for layer, f in pairs:
            if layer not in saes:
                raise EmoscopeError(f"audit.causal_features.{lab}: layer {layer} has no SAE (layers with one: "
                                    f"{', '.join(map(str, sorted(saes)))})")
            if not 0 <= f < saes[layer].cfg.d_sae:
                raise EmoscopeError(f"audit.causal_features.{lab}: feature {f} is outside layer {layer}'s SAE "
                                    f"(0..{saes[layer].cfg.d_sae - 1})")
    return {k: [list(f) for f in v] for k, v in features.items()}


def _causal_sets(trace, phases) -> dict[str, list[list[int]]]:
    """Causal features per emotion: tracing's chosen sets, else the phases stage's top features. An emotion whose
    sets are empty (no small set removed half its margin: SmolLM2's quick trace) keeps the traced features whose
    own ablation's interval lies above the random control's, so its causal features are still audited."""
    if trace is not None:
        return {lab: traced(e) for lab, e in trace["emotions"].items()}
    if phases is not None:
        return {lab: [[f["layer"], f["feature"]] for f in fs] for lab, fs in phases["top_features"].items()}
    return {}


def traced(emotion: dict) -> list[list[int]]:
    """An emotion's traced causal features: its chosen sets, else those above the random control."""
    chosen = [f for p in emotion["phases"].values() for f in p["set"]]
    if chosen:
        return chosen
    return [[f["layer"], f["feature"]] for p in emotion["phases"].values() if p.get("random_control")
            for f in p["features"] if f["effect"]["lo"] > p["random_control"]["hi"]]
