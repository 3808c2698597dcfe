"""Canary: a few of the audit's examples that tell in seconds whether a build still infers emotions as the audited
reference does. `write(...)` makes one at the end of an audit; `check(model, canary)` runs it on a build.

A canary (a folder: canary.json + canary.safetensors) holds:
- the N examples that are most fragile (the reference's smallest calibrated margins) and most diagnostic (the
  largest drops when an emotion's causal set is ablated), their prompts' token ids and the reference's calibrated
  label log-probs on them;
- the reference's margins on every audited example (top label over the best other, and over the gold label);
- the causal features' encoder columns (the SAE sliced to them), their reference pre-activations on the N examples,
  the pre-activation at which each counts as active, and a tolerance per feature: `kappa` times the largest change
  of that feature among the audit's passing 8-bit candidates (llama.cpp Q8_0, int8, an 8-bit KV cache, ...).

A check scores only the N examples on the build and applies the audit's own thresholds:
- labels: the flip rate and accuracy change over every audited example are estimated, observed on the canary's own
  examples and, for the others, predicted from their reference margins: P(margin + e < 0), e drawn from the
  canary examples' margin changes (their empirical distribution); they are gated by `max_flip_rate` and
  `max_accuracy_drop`;
- features: the share of the causal features still active where the reference had them active is gated by
  `min_causal_survival`; features that moved beyond their 8-bit tolerance are named beside the verdict.
`bench/canary.py` measures how often this verdict agrees with the full audit, candidate by candidate.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .backends.base import require, supports
from .data import Example
from .errors import EmoscopeError, validated
from .sae import SAE, SAEConfig
from .deployment.candidates import Candidate, bits, candidate_task
from .deployment.reference import Reference, Thresholds, margins
from .stages.audit import AuditConfig, AuditResult
from .stages.base import Stage, StageResult
from .stages.evaluate import EvalResult
from .task import Task, TaskConfig, calibrate

FORMAT = 1
"""Version of the on-disk format (canary.json's `format`)."""
FILES = ("canary.json", "canary.safetensors", "result.json", "timing.json")
"""What a canary folder holds: the canary, and the stage's summary when the pipeline wrote it."""


class CanaryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    n: int = Field(48, ge=4)
    """Examples in the canary: half the most fragile, half the most diagnostic (48: SmolLM2's borderline builds
    decided as the full audit decides them, where 24 left them uncertain; docs/findings.md)."""
    kappa: float = Field(2.0, gt=0)
    """A feature's tolerance: this many times its largest change among the passing 8-bit candidates."""
    floor: float = Field(0.02, ge=0, le=1)
    """Smallest tolerance, as a share of the feature's mean reference pre-activation where active."""
    confidence: float = Field(0.9, gt=0, lt=1)
    """Two-sided confidence of the interval around the predicted flip rate and accuracy change (a bootstrap over the
    canary's margin changes); a threshold inside it makes the verdict 'uncertain' (exit 1: run the full audit)."""


class CanaryCheck(NamedTuple):
    passed: bool
    """The audit's thresholds hold on the canary's estimates."""
    drifted: list[str]
    """What broke a threshold: 'labels', 'features', both or none."""
    uncertain: list[str]
    """'labels' when the predicted flip rate or accuracy change is within its thresholds but its interval is not:
    too close to call on the canary alone (the verdict is then a fail, as for a drift)."""
    predicted_flip_rate: float
    """Flip rate over all audited examples predicted from the canary's margin changes."""
    flip_rate_interval: tuple[float, float]
    """Its interval at the canary's `confidence`."""
    predicted_accuracy_change: float
    """Accuracy change over all audited examples predicted the same way."""
    canary_flips: int
    """Canary examples whose prediction changed."""
    causal_survival: float | None
    """Share of the causal features still active where the reference had them active (None: no causal features)."""
    out_of_band: list[str]
    """Features beyond their 8-bit tolerance on most of their active examples, as emotion:L{layer}/f{feature}."""
    seconds: float
    """Wall time of the check (scoring and reading the features; loading the build not included)."""
    template: list[str] = []
    """How the prompts this build renders differ from the audited ones (its chat template, the text around the
    example), each named; any makes the check fail with 'template' among `drifted`."""
    unchecked: list[str] = []
    """What this backend cannot check: 'features' when it cannot read the residual stream (a serving endpoint)."""

    def to_dict(self) -> dict:
        return self._asdict()


@dataclass
class Canary:
    meta: dict
    """JSON part: labels, task config, texts, demonstrations, features, thresholds, provenance."""
    arrays: dict[str, np.ndarray]
    """safetensors part: reference log-probs, margins, feature encoders, pre-activations, tolerances."""

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "canary.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(tmp))
        (folder / "canary.json.tmp").write_text(json.dumps(self.meta, indent=1))
        tmp.replace(folder / "canary.safetensors")
        (folder / "canary.json.tmp").replace(folder / "canary.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Canary":
        folder = Path(folder).expanduser()
        if folder.is_file() and folder.name in ("canary.json", "canary.safetensors"):
            folder = folder.parent
        meta_path, arr_path = folder / "canary.json", folder / "canary.safetensors"
        for p in (meta_path, arr_path):
            if not p.is_file():
                raise EmoscopeError(f"not a canary: {p} is missing (write one with `emoscope canary write`)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EmoscopeError(f"canary {meta_path} is not valid JSON: {e}") from None
        try:
            from safetensors.numpy import load_file
            arrays = load_file(str(arr_path))
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise EmoscopeError(f"canary {arr_path} is not a readable safetensors file: {e}") from None
        canary = cls(meta, arrays)
        canary._validate(folder)
        return canary

    def _validate(self, folder: Path) -> None:
        m = self.meta
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise EmoscopeError(f"canary {folder}: unknown format {m.get('format') if isinstance(m, dict) else m!r} "
                                f"(this emoscope reads format {FORMAT})")
        need = ("labels", "task", "texts", "gold", "prompts", "label_ids", "ref_pred", "features", "thresholds",
                "demos")
        missing = [k for k in need if k not in m]
        arrays = ("ref_cal", "canary_index", "margins_all", "gold_margins_all", "correct_all", "ref_pre",
                  "active_at", "ref_active", "tolerance")
        missing += [k for k in arrays if k not in self.arrays]
        if missing:
            raise EmoscopeError(f"canary {folder} lacks {', '.join(missing)}")
        n, k, f = len(m["texts"]), len(m["labels"]), len(m["features"])
        if n == 0 or k < 2 or len(self.arrays["margins_all"]) == 0:
            raise EmoscopeError(f"canary {folder}: {n} examples, {k} labels and {len(self.arrays['margins_all'])} "
                                "audited examples: nothing to check (write it again with `emoscope canary write`)")
        shapes = {"ref_cal": (n, k), "canary_index": (n,), "ref_pre": (n, f), "active_at": (n, f),
                  "ref_active": (n, f), "tolerance": (f,)}
        for key, shape in shapes.items():
            if tuple(self.arrays[key].shape) != shape:
                raise EmoscopeError(f"canary {folder}: {key} has shape {tuple(self.arrays[key].shape)}, not {shape}")
        if len(m["prompts"]) != n or len(m["ref_pred"]) != n or len(m["gold"]) != n:
            raise EmoscopeError(f"canary {folder}: {n} texts but {len(m['prompts'])} prompts")
        idx, n_all = self.arrays["canary_index"], len(self.arrays["margins_all"])
        if len(idx) and (idx.min() < 0 or idx.max() >= n_all) or any(g not in m["labels"] for g in m["gold"]):
            raise EmoscopeError(f"canary {folder}: its examples do not index its {n_all} audited ones")
        try:
            validated(TaskConfig, m["task"], "canary task.")
            validated(Thresholds, m["thresholds"], "canary thresholds.")
            validated(CanaryConfig, {"confidence": confidence(m)}, "canary ")
        except EmoscopeError as e:
            raise EmoscopeError(f"canary {folder}: {e}") from None

    @property
    def task_config(self) -> TaskConfig:
        return validated(TaskConfig, self.meta["task"], "canary task.")

    @property
    def thresholds(self) -> Thresholds:
        return validated(Thresholds, self.meta["thresholds"], "canary thresholds.")


# ---------------------------------------------------------------------------------------------------- writing
def check_out(folder: str | Path) -> Path:
    """Where a canary may be written: a new folder (its parent creatable) or an existing canary's, never a file or a
    folder holding something else. Checked before any work, so a refused call writes nothing."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EmoscopeError(f"--out {folder}: a file is there, not a folder for the canary")
    if folder.is_dir() and any(p.name not in FILES for p in folder.iterdir()):
        raise EmoscopeError(f"--out {folder}: the folder holds other files; name a new folder or an existing canary's")
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise EmoscopeError(f"--out {folder}: cannot create it under {parent} (not a writable folder)")
    return folder


def write(task: Task, saes: dict, evaluation: EvalResult, audit_result: AuditResult, phases=None, trace=None,
          config: CanaryConfig | dict | None = None, load_view=None) -> Canary:
    """A canary of an audit: its examples chosen, the reference's answers and causal features read, and the
    features' tolerances measured on the audit's passing 8-bit candidates (rerun on the canary's examples)."""
    cfg = config if isinstance(config, CanaryConfig) else validated(CanaryConfig, config or {}, "canary.")
    require(task.model, "canary")
    acfg = validated(AuditConfig, audit_result["config"], "audit.")
    ref = Reference.measure(task, saes, evaluation, phases, trace, acfg)
    idx = _choose(ref, cfg.n)
    feats = [(lab, int(layer), int(f)) for lab in ref.labels for layer, f in ref.causal.get(lab, [])
             if int(layer) in ref.saes]
    sliced = _slice(ref.saes, feats)
    texts = [ref.texts[i] for i in idx]
    meta = {**_meta(task, ref, idx, feats, sliced, audit_result, acfg.thresholds), "confidence": cfg.confidence}
    arrays = {**_label_arrays(ref, idx), "ref_pre": pre_acts(sliced, feats, ref.obs.resid, idx),
              **_slice_arrays(sliced)}
    arrays["active_at"], arrays["ref_active"] = _activity(ref, feats, idx)
    canary = Canary(meta, arrays)
    spread, used = _eight_bit_spread(canary, task, texts, audit_result, acfg, load_view)
    canary.meta["tolerance_from"] = used
    arrays["tolerance"] = _tolerance(arrays["ref_pre"], arrays["ref_active"], spread, cfg)
    return canary


def _choose(ref, n: int) -> list[int]:
    """Half the smallest calibrated margins, half the largest causal-set ablation effects (every emotion in turn),
    then more of the smallest margins until there are n."""
    cal = ref.obs.cal
    fragile = list(np.argsort(margins(cal), kind="stable"))
    ranked = {lab: [int(ref.abl_idx[lab][j]) for j in np.argsort(-eff, kind="stable")]
              for lab, eff in ref.obs.effects.items()}
    chosen: list[int] = []
    while len(chosen) < n // 2 and any(ranked.values()):
        for lab in list(ranked):
            while ranked[lab] and ranked[lab][0] in chosen:
                ranked[lab].pop(0)
            if ranked[lab] and len(chosen) < n // 2:
                chosen.append(ranked[lab].pop(0))
    for i in fragile:
        if len(chosen) >= min(n, len(fragile)):
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return sorted(chosen)


def _label_arrays(ref, idx: list[int]) -> dict[str, np.ndarray]:
    cal, pred, y = ref.obs.cal, ref.obs.pred, ref.y
    gold = cal[np.arange(len(y)), pred] - cal[np.arange(len(y)), y]
    return {"ref_cal": cal[idx].astype(np.float64), "canary_index": np.asarray(idx, np.int64),
            "margins_all": margins(cal, pred).astype(np.float64),
            "gold_margins_all": gold.astype(np.float64), "correct_all": (pred == y).astype(np.uint8)}


def _slice(saes: dict, feats: list[tuple[str, int, int]]) -> dict[int, SAE]:
    """Per layer with causal features, its SAE cut down to them (their encoder columns; pre-activations only)."""
    out = {}
    for layer in sorted({la for _, la, _ in feats}):
        sae, fs = saes[layer], [f for _, la, f in feats if la == layer]
        c = sae.cfg
        cut = SAE(SAEConfig(d_in=c.d_in, d_sae=len(fs), architecture=c.architecture, k=min(c.k, len(fs)),
                            hook_name=c.hook_name, model_name=c.model_name,
                            apply_b_dec_to_input=c.apply_b_dec_to_input, normalize=c.normalize))
        with torch.no_grad():
            cut.W_enc.copy_(sae.W_enc[:, fs].float().cpu())
            cut.b_enc.copy_(sae.b_enc[fs].float().cpu())
            cut.b_dec.copy_(sae.b_dec.float().cpu())
            if c.architecture == "jumprelu":
                cut.threshold.copy_(sae.threshold[fs].float().cpu())
        out[layer] = cut
    return out


def _slice_arrays(sliced: dict[int, SAE]) -> dict[str, np.ndarray]:
    out = {}
    for layer, sae in sliced.items():
        for name in ("W_enc", "b_enc", "b_dec") + (("threshold",) if sae.cfg.architecture == "jumprelu" else ()):
            out[f"sae.{layer}.{name}"] = getattr(sae, name).detach().numpy().astype(np.float32)
    return out


def pre_acts(sliced: dict[int, SAE], feats, resid: dict[int, np.ndarray], rows=None) -> np.ndarray:
    """The causal features' pre-activations [n, F] from answer-position residuals (rows of them, or all); a
    non-finite one (an overflowing build) counts as far below active."""
    cols = []
    with torch.no_grad():
        for _, layer, f in feats:
            x = resid[layer] if rows is None else resid[layer][rows]
            j = [ff for _, la, ff in feats if la == layer].index(f)
            pre = sliced[layer].pre_acts(torch.from_numpy(np.asarray(x, np.float32)))[:, j]
            cols.append(np.nan_to_num(pre.numpy(), nan=-1e9, posinf=-1e9, neginf=-1e9))
    n = len(next(iter(resid.values()), [])) if rows is None else len(rows)
    return np.stack(cols, 1).astype(np.float32) if cols else np.zeros((n, 0), np.float32)


def _activity(ref, feats, idx) -> tuple[np.ndarray, np.ndarray]:
    """Per canary example and feature: the pre-activation above which it is active (TopK: that example's k-th
    largest pre-activation in the full SAE; JumpReLU: its threshold; ReLU: 0), and whether the reference has it on."""
    at = np.zeros((len(idx), len(feats)), np.float32)
    on = np.zeros((len(idx), len(feats)), np.uint8)
    with torch.no_grad():
        for j, (_, layer, f) in enumerate(feats):
            sae = ref.saes[layer]
            on[:, j] = ref.obs.codes[layer][idx, f] > 0
            if sae.cfg.architecture == "topk":
                x = torch.from_numpy(ref.obs.resid[layer][idx]).to(sae.W_enc)
                at[:, j] = sae.pre_acts(x).topk(sae.cfg.k, dim=-1).values[:, -1].clamp_min(0).float().cpu().numpy()
            elif sae.cfg.architecture == "jumprelu":
                at[:, j] = float(sae.threshold[f])
    return at, on


def _meta(task, ref, idx, feats, sliced, audit_result, thresholds) -> dict:
    from importlib.metadata import version  # not the package's __init__, which imports the stage registry

    __version__ = version("emoscope")
    tc = task.config
    view = task.model
    return {"format": FORMAT, "emoscope": __version__, "model": view.name, "reference": audit_result["reference"],
            "labels": ref.labels, "task": tc.model_dump(mode="json"),
            "demos": [{"id": d.id, "text": d.text, "labels": list(d.labels)} for d in task.demos],
            "prior_texts": task.prior_texts() if tc.calibration == "train" else None,
            "texts": [ref.texts[i] for i in idx], "gold": [ref.labels[int(ref.y[i])] for i in idx],
            "prompts": [ref.obs.prompts[i] for i in idx], "label_ids": task.label_ids,
            "ref_pred": [int(ref.obs.pred[i]) for i in idx], "n_audited": int(len(ref.y)),
            "features": [{"emotion": lab, "layer": la, "feature": f} for lab, la, f in feats],
            "saes": {str(la): {"d_in": s.cfg.d_in, "architecture": s.cfg.architecture, "hook_name": s.cfg.hook_name,
                               "apply_b_dec_to_input": s.cfg.apply_b_dec_to_input, "normalize": s.cfg.normalize}
                     for la, s in sliced.items()},
            "thresholds": thresholds.model_dump(mode="json"), "audit_seed": audit_result["seed"],
            "prompt_texts": [task.prompt(ref.texts[i]) for i in idx], "chat": bool(view.chat),
            "chat_template": getattr(view.tokenizer, "chat_template", None) or None,
            "d_model": int(view.d_model)}


def _tolerance(ref_pre, ref_active, spread, cfg: CanaryConfig) -> np.ndarray:
    on = ref_active.astype(bool)
    scale = np.array([np.abs(ref_pre[on[:, j], j]).mean() if on[:, j].any() else 1.0 for j in range(on.shape[1])])
    return np.maximum(cfg.kappa * spread, cfg.floor * scale).astype(np.float32)


def _eight_bit_spread(canary: Canary, task: Task, texts, audit_result, acfg, load_view) -> tuple[np.ndarray, list]:
    """Per feature, its largest |change| on its active canary examples among the audit's passing 8-bit candidates
    (each rerun on the canary's examples); zeros, and no names, when the audit had none."""
    spread = np.zeros(len(canary.meta["features"]), np.float32)
    used = []
    for row in audit_result["candidates"]:
        ch = row["changed"]
        if row["failed"] or set(ch) - {"precision", "kv_cache", "runtime", "threads"}:
            continue
        cand = Candidate(name=row["name"], **ch)
        w, kv = bits(cand)
        if not (w == 8 or (kv == 8 and w is None)):  # an 8-bit build: its weights, or only its cache
            continue
        with candidate_task(cand, task, texts, acfg, load_view) as (ctask, ctexts, _):
            obs = observe(canary, ctask, ctexts)
        on = canary.arrays["ref_active"].astype(bool)
        d = np.where(on, np.abs(obs.pre - canary.arrays["ref_pre"]), 0)
        spread = np.maximum(spread, d.max(0) if len(d) else spread)
        used.append(row["name"])
    return spread, used


# ---------------------------------------------------------------------------------------------------- checking
def _sliced_from(canary: Canary) -> dict[int, SAE]:
    out = {}
    for layer, s in canary.meta["saes"].items():
        n = sum(1 for f in canary.meta["features"] if f["layer"] == int(layer))
        sae = SAE(SAEConfig(d_in=s["d_in"], d_sae=n, architecture=s["architecture"], hook_name=s["hook_name"],
                            apply_b_dec_to_input=s["apply_b_dec_to_input"], normalize=s["normalize"]))
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name != "W_dec":  # pre-activations only: the decoder is not stored
                    p.copy_(torch.from_numpy(canary.arrays[f"sae.{layer}.{name}"]))
        out[int(layer)] = sae
    return out


class CanaryObservation(NamedTuple):
    """A build's answers and causal features on the canary's examples."""
    cal: np.ndarray
    """[n, K] calibrated label log-probs."""
    pre: np.ndarray | None
    """[n, F] the causal features' pre-activations (None: the backend cannot read them)."""
    prompts: list[list[int]]
    """The prompts' token ids."""


def observe(canary: Canary, task: Task, texts: list[str] | None = None) -> CanaryObservation:
    """The build's calibrated log-probs [n, K] and the causal features' pre-activations [n, F] on the canary's
    examples (its texts, or `texts` instead: the same examples with a candidate's noise)."""
    texts = canary.meta["texts"] if texts is None else texts
    feats = [(f["emotion"], f["layer"], f["feature"]) for f in canary.meta["features"]]
    layers = sorted({la for _, la, _ in feats})
    prompts = task.encode_all(texts)
    if "read_answer" not in supports(task.model):  # a serving endpoint: label scores only
        logp = task.model.score_ids(prompts, task.label_ids, task.config.batch_size)
        return CanaryObservation(calibrate.apply_prior(logp, task.log_prior()), None, prompts)
    if layers:
        logp, res = task.model.score_ids(prompts, task.label_ids, task.config.batch_size, resid_layers=layers)
    else:  # no causal features: label scores only
        logp, res = task.model.score_ids(prompts, task.label_ids, task.config.batch_size), {}
    cal = calibrate.apply_prior(logp, task.log_prior())
    pre = pre_acts(_sliced_from(canary), feats, res) if feats else np.zeros((len(texts), 0), np.float32)
    return CanaryObservation(cal, pre, prompts)


def judge(canary: Canary, obs: CanaryObservation, seconds: float = 0.0, template: list[str] = ()) -> CanaryCheck:
    """The audit's thresholds applied to what the canary predicts (see the module's docstring); `template`: how the
    build's rendered prompts differ from the audited ones (a failure of its own)."""
    a, t = canary.arrays, canary.thresholds
    top = np.array(canary.meta["ref_pred"])
    bad = ~np.isfinite(obs.cal).all(1)
    cal = np.where(bad[:, None], 0.0, obs.cal)
    d = np.where(bad, -1e3, margins(cal, top) - margins(a["ref_cal"], top))
    flipped = (cal.argmax(1) != top) | bad
    flip_rate, acc_change = _predicted(a, d, flipped, cal.argmax(1), bad, canary.meta)
    (f_lo, f_hi), (a_lo, _) = _band(a, d, flipped, cal.argmax(1), bad, canary.meta)
    survival, named = _features(canary, obs.pre) if obs.pre is not None else (None, [])
    # the audit's verdict on the estimates (the effect retained is not measured here, so not gated); labels are
    # uncertain when the interval's worst end would break them; a drifted template is a failure of its own
    drifted = t.verdict(acc_change, flip_rate, survival, non_finite=bool(bad.any())) + (["template"] if template
                                                                                        else [])
    uncertain = ["labels"] if "labels" not in drifted and "labels" in t.verdict(a_lo, f_hi) else []
    unchecked = ["features"] if obs.pre is None and canary.meta["features"] else []
    return CanaryCheck(not drifted and not uncertain, drifted, uncertain, flip_rate, (f_lo, f_hi), acc_change,
                       int(flipped.sum()), survival, named, seconds, list(template), unchecked)


def _features(canary: Canary, pre: np.ndarray) -> tuple[float | None, list[str]]:
    """The share of causal features still active where the reference had them active, and the features beyond
    their 8-bit tolerance on most of their active examples."""
    a = canary.arrays
    on = a["ref_active"].astype(bool)
    survival = float((pre > a["active_at"])[on].mean()) if on.any() else None
    beyond = (np.abs(pre - a["ref_pre"]) > a["tolerance"]) & on
    named = [f"{f['emotion']}:L{f['layer']}/f{f['feature']}" for j, f in enumerate(canary.meta["features"])
             if on[:, j].any() and beyond[:, j].sum() * 2 > on[:, j].sum()]
    return survival, named


def confidence(meta: dict) -> float:
    """The canary's interval confidence (the config default for canaries written before it was stored)."""
    return meta.get("confidence", CanaryConfig.model_fields["confidence"].default)


def _band(a: dict, d: np.ndarray, flipped, pred, bad, meta: dict, n_boot: int = 1000):
    """Intervals of (flip rate, accuracy change) at the canary's confidence: `_predicted` with the canary examples'
    margin changes resampled (seeded; the canary's own flips are observed, not resampled)."""
    rng = np.random.default_rng(0)
    draws = np.array([_predicted(a, d[rng.integers(0, len(d), len(d))], flipped, pred, bad, meta)
                      for _ in range(n_boot)])
    q = (1 - confidence(meta)) / 2
    lo, hi = np.quantile(draws, [q, 1 - q], axis=0)
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def _predicted(a: dict, d: np.ndarray, flipped: np.ndarray, pred: np.ndarray, bad: np.ndarray, meta: dict):
    """(flip rate, accuracy change) over every audited example: observed on the canary's own examples, and for
    the others P(margin + e < 0) with e drawn from the canary's margin changes."""
    rest = np.ones(len(a["margins_all"]), bool)
    rest[a["canary_index"]] = False
    p_flip = _exceed(a["margins_all"][rest], d)
    p_gain = _exceed(a["gold_margins_all"][rest], d) * (a["gold_margins_all"][rest] > 0)
    correct = a["correct_all"].astype(bool)
    gold = np.array([meta["labels"].index(g) for g in meta["gold"]])
    now_right = (pred == gold) & ~bad
    flips = flipped.sum() + p_flip.sum()
    change = (now_right.astype(int) - correct[a["canary_index"]]).sum() + np.where(correct[rest], -p_flip,
                                                                                     p_gain).sum()
    return float(flips / len(rest)), float(change / len(rest))


def _exceed(margins: np.ndarray, d: np.ndarray) -> np.ndarray:
    """P(margin + e < 0), e drawn from the canary's margin changes d (their empirical distribution)."""
    return (margins[:, None] + d[None, :] < 0).mean(1) if len(d) else np.zeros(len(margins))


def _task_on(canary: Canary, model, template=None) -> Task:
    cfg = canary.task_config
    if template is not None:
        cfg = cfg.model_copy(update={"template": template})
    demos = [Example(d["id"], d["text"], tuple(d["labels"])) for d in canary.meta["demos"]]
    task = Task.from_parts(model, cfg, canary.meta["labels"], demos, canary.meta.get("prior_texts"))
    if task.label_ids != canary.meta["label_ids"]:
        tok = model.tokenizer
        spelled = [tok.decode(ids) for ids in canary.meta["label_ids"]]
        if _reads_back(tok, canary):  # the same vocabulary: the label names are what changed
            raise EmoscopeError(f"the canary's labels ({', '.join(canary.meta['labels'])}) are not the ones its "
                                f"reference's label tokens spell ({', '.join(s.strip() for s in spelled)}) in this "
                                "build's tokenizer: the canary was edited, or the build's task has other labels")
        raise EmoscopeError("this build's tokenizer gives other label tokens than the canary's reference "
                            f"({task.label_ids} against {canary.meta['label_ids']}): it is not the same model")
    return task


def _reads_back(tokenizer, canary: Canary) -> bool:
    """Whether this tokenizer decodes the canary's reference prompt ids back into text holding its texts' ends (the
    same vocabulary), which tells a canary whose label names were changed from a build with another tokenizer."""
    tails = [t.strip()[-24:] for t in canary.meta["texts"][:4]]
    return all(tail in tokenizer.decode(ids) for tail, ids in zip(tails, canary.meta["prompts"][:4]))


def check(model, canary: Canary | str | Path, template=None) -> CanaryCheck:
    """Run the canary on a loaded build (`es.load_model(path)` or `es.load_model(path, backend="llama.cpp")`),
    optionally with another prompt template; `passed` is the verdict, `drifted` says what broke.

    >>> result = es.canary.check(es.load_model("model.Q4_K_M.gguf", backend="llama.cpp"), "runs/deploy/canary")
    >>> if not result.passed: raise SystemExit(f"emotion canary: {result.drifted} drifted")
    """
    canary = canary if isinstance(canary, Canary) else Canary.load(canary)
    _same_model(model, canary)
    task = _task_on(canary, model, template)
    t0 = time.perf_counter()
    drift = [] if template is not None else template_drift(canary, task)
    obs = observe(canary, task)
    if template is None and not drift and obs.prompts != canary.meta["prompts"]:
        raise EmoscopeError("this build's tokenizer encodes the canary's prompts into other token ids than the "
                            "reference's: it is not the same model, so its features cannot be compared")
    model.check_tokens([task.prompt(t) for t in canary.meta["texts"]], obs.prompts, task.builder.label_strings(),
                       task.label_ids)  # llama.cpp's own tokenizer against the reference's fed to it
    return judge(canary, obs, time.perf_counter() - t0, drift)


def _same_model(model, canary: Canary) -> None:
    """Refuse, in one line, a build whose width is not the reference's (another model; a vocabulary is compared
    through the prompts' and labels' token ids, since tokenizer and embedding sizes differ within one model)."""
    m = canary.meta
    d_ref = m.get("d_model") or next((s["d_in"] for s in m["saes"].values()), None)
    if d_ref and getattr(model, "d_model", 0) and model.d_model != d_ref:
        raise EmoscopeError(f"{model.name} has width {model.d_model}, the canary's reference ({m['model']}) "
                            f"{d_ref}: another model")


def template_drift(canary: Canary, task: Task) -> list[str]:
    """How the prompts this build renders differ from the audited ones, each named: its chat template (a chat
    reference), and the first canary prompt that differs, located before or after the example's text (empty: the
    same prompts; a canary written before these were stored is not checked)."""
    m, out = canary.meta, []
    served, audited = (str(t or "").strip() or None for t in (getattr(task.model.tokenizer, "chat_template", None),
                                                               m.get("chat_template")))  # llama.cpp strips the ends
    if m.get("chat") and served != audited:
        out.append("chat template: " + (f"{_digest(served)} served, {_digest(audited)} audited" if served and audited
                                        else "the build has none, the audit had one" if audited
                                        else "the build has one, the audit had none"))
    for text, want in zip(m["texts"], m.get("prompt_texts") or []):
        got = task.prompt(text)
        if got != want:
            out.append(_where(want, got, text))
            break
    return out


def _digest(s: str) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()[:12]


def _where(want: str, got: str, text: str) -> str:
    """The first difference between the audited and the served prompt, named by where it falls and shown."""
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    at = want.find(text)
    part = "the system prompt or instruction before the text" if at < 0 or i < at else "the answer cue after the text"
    a = max(0, i - 20)
    return (f"rendered prompt differs in {part} (at character {i}): audited {want[a:i + 60]!r}, served "
            f"{got[a:i + 60]!r}")


def check_candidate(canary: Canary, task: Task, cand: Candidate, audit_config: AuditConfig,
                    load_view=None) -> CanaryCheck:
    """The canary on an audit candidate built as the audit builds it from the reference task (the agreement
    measurement of bench/canary.py)."""
    with candidate_task(cand, task, canary.meta["texts"], audit_config, load_view) as (ctask, texts, _):
        t0 = time.perf_counter()
        obs = observe(canary, ctask, texts)
        return judge(canary, obs, time.perf_counter() - t0)


class CanaryResult(StageResult):
    """The canary stage's result: the canary (`canary`) and a summary (`data`) in one folder, RUN_DIR/canary/."""

    stage = "canary"

    def __init__(self, data: dict, tables=None, timing=None, canary: Canary | None = None):
        super().__init__(data, tables, timing)
        self.canary = canary

    def _write(self, folder: Path) -> None:
        super()._write(folder)
        self.canary.save(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "CanaryResult":
        res = super().load(folder)
        res.canary = Canary.load(folder)
        return res


def _run(ctx, cfg: CanaryConfig, progress, workdir) -> CanaryResult:
    canary = write(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.result("audit"), ctx.optional("phases"),
                   ctx.optional("trace"), cfg)
    data = {"stage": "canary", "model": canary.meta["model"], "config": cfg.model_dump(mode="json"),
            "n": len(canary.meta["texts"]), "n_audited": canary.meta["n_audited"],
            "features": len(canary.meta["features"]), "tolerance_from": canary.meta["tolerance_from"]}
    return CanaryResult(data, canary=canary)


STAGE = Stage("canary", CanaryConfig, CanaryResult, upstream=("audit",), needs=("evaluate", "saes", "audit"),
              run=_run, printer="print_canary_written",
              summary="A few of the audit's examples that tell in seconds whether a build still behaves as audited.")
