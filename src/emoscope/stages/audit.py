"""Stage `audit`: do prompt changes, a lower weight precision, a quantized KV cache or another model file
silently break emotion inference?
`audit(task, saes, evaluation, phases, trace)` returns an `AuditResult`.


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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..backend import require
from ..analysis.drift import auroc_or_none, derangement, jaccard_topk, phase_drift, retained, rowcorr
from ..artifacts import config_hash
from ..errors import EmoscopeError, validated
from ..hooks import residual_by_layer
from ..interventions.answers import first_token_prior
from ..interventions.effects import ablate_each
from ..interventions.kv_cache import check_kv_cache, kv_cache_quantized
from ..interventions.perturb import PRECISIONS, check_precision, perturb_text, precision_applied, template_variants
from .. import llamacpp, quantization
from ..models import ModelConfig, ModelView, gguf_source, load_model
from ..quantization import SCHEMES as LIBRARY
from ..task import Task, TaskConfig, calibrate
from ..task.metrics import classification_metrics
from ..task.score import score_ids
from ..task.prompts import Template
from .base import StageResult
from .evaluate import EvalResult
from .phases import PhasesResult
from .trace import TraceResult
from ..constraints import Name, NonNegative, Seed, Share, Threads, unique_names


def _known_precision(v: str) -> str:
    if v.startswith("llama.cpp:"):
        if v.split(":", 1)[1] not in llamacpp.FTYPES:
            raise ValueError(f"unknown llama.cpp type '{v}': choose llama.cpp:{', llama.cpp:'.join(llamacpp.FTYPES)}")
        return v
    try:
        return check_precision(v)
    except EmoscopeError as e:
        raise ValueError(str(e)) from None


SOURCE = "source"
"""`model: source` of a llama.cpp candidate: the GGUF file the reference was dequantised from, run as it is."""


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Name
    """Label of the candidate in tables and file names (no slash)."""
    template: Template | None = None
    """Prompt template replacing the reference's."""
    shots: int | None = Field(None, ge=0)
    """Number of demonstrations replacing the reference's."""
    demo_seed: Seed | None = None
    """Seed drawing other demonstrations."""
    text: Literal["lower", "upper", "whitespace", "typos"] | None = None
    """Noise applied to every input text."""
    precision: Annotated[str, AfterValidator(_known_precision)] | None = None
    """Weight precision: float32, bfloat16, float16, weight-only RTN int8 / int4 / int3, a llama.cpp type
    through the gguf package (gguf:Q8_0, gguf:Q5_1, gguf:Q5_0, gguf:Q4_1, gguf:Q4_0, ...), or a library's
    kernels on load (torchao:int8|int4, quanto:int8|int4|float8, bnb:int8|nf4 on CUDA)."""
    model: str | None = None
    """Another checkpoint of the same model (same tokenizer), e.g. a quantized export; with runtime llama.cpp, a
    .gguf file or `source` (the reference's own GGUF file as shipped)."""
    kv_cache: str | None = None
    """Quantized KV cache: every attention reads its keys and values through the cache's quantizer
    (quanto:int4|int2 as transformers' QuantizedCache, gguf:Q8_0|Q4_0|Q4_1|Q5_0|Q5_1 as llama.cpp's
    --cache-type-k/-v emulated in PyTorch); with runtime llama.cpp, llama.cpp's own cache: f16, q8_0 or q4_0."""
    runtime: Literal["transformers", "llama.cpp"] | None = Field(None, exclude_if=lambda v: v is None)
    """Where the candidate runs: transformers (PyTorch, the default) or llama.cpp itself (scoring, SAE features and
    ablations read inside llama.cpp; `pip install 'emoscope[llamacpp]'`): the reference's weights as an F32 GGUF,
    or `model` (a .gguf file as shipped). A precision llama.cpp:TYPE implies it."""
    threads: Threads | None = Field(None, exclude_if=lambda v: v is None)
    """CPU threads of a llama.cpp candidate (unset: every core); recorded in its row."""

    @model_validator(mode="after")
    def _runtime_fields(self):
        built = bool(self.precision and self.precision.startswith("llama.cpp:"))
        if built and self.runtime is None:
            self.runtime = "llama.cpp"
        if built and self.model is not None:
            raise ValueError(f"precision {self.precision} quantizes the reference's weights: give it or a model, "
                             "not both")
        if self.runtime == "llama.cpp":
            if self.precision and not built:
                raise ValueError("runtime llama.cpp takes a precision llama.cpp:TYPE (Q8_0, Q4_K_M, ...), not "
                                 f"{self.precision}")
            if self.kv_cache is not None and self.kv_cache not in llamacpp.KV_TYPES:
                raise ValueError(f"llama.cpp kv_cache '{self.kv_cache}': choose {', '.join(llamacpp.KV_TYPES)}")
            if self.model is not None and self.model != SOURCE and not self.model.endswith(".gguf"):
                raise ValueError(f"a llama.cpp model is a .gguf file (or '{SOURCE}', the reference's own GGUF as "
                                 f"shipped), not {self.model}")
        else:
            if self.threads is not None:
                raise ValueError("threads is a setting of runtime llama.cpp")
            if self.kv_cache is not None:
                check_kv_cache(self.kv_cache)
        return self


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    max_accuracy_drop: Share = 0.05
    """Largest tolerated drop in calibrated accuracy."""
    max_flip_rate: Share = 0.2
    """Largest tolerated share of changed predictions."""
    min_causal_survival: Share = 0.5
    """Smallest tolerated share of causal features still active."""
    min_effect_retained: NonNegative | None = None
    """Smallest tolerated share of the causal sets' ablation effect still there (None: not gated)."""


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    candidates: Annotated[list[Candidate], Field(min_length=1),
                          AfterValidator(lambda v: unique_names(v, "candidates"))] | Literal["default"] = "default"
    """Candidates, or 'default': paraphrases, label order, system prompt, demonstrations, text noise,
    bf16/fp16/int8/int4/int3."""
    thresholds: Thresholds = Thresholds()
    causal_features: dict[str, list[tuple[int, int]]] | None = None
    """Causal features per emotion as [layer, feature] pairs; default: tracing's sets, else the phases stage's top
    features."""
    ablation_per_emotion: int = Field(20, ge=0)
    """Examples per emotion on which each candidate's causal sets are ablated, to see whether they still matter (0:
    skip)."""
    top_k: int = Field(32, ge=1)
    """Active features compared by Jaccard per layer."""
    group_size: int = Field(128, ge=8)
    """Group size of the RTN weight quantization."""
    n_boot: int = Field(1000, ge=100)
    """Paired bootstrap resamples."""
    seed: Seed = 0
    """Seed for text noise, demonstrations and the bootstrap."""


class AuditResult(StageResult):
    """One row per candidate (`to_frame()`); `failed` names those over the thresholds."""

    stage = "audit"

    @property
    def failed(self) -> list[str]:
        return self.data["failed"]

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for c in self.data["candidates"]:
            ch, eff = c["accuracy_change"], c["causal_effect"] or {}
            rows.append({"candidate": c["name"], "accuracy": c["accuracy"], "accuracy_change": ch["value"],
                         "accuracy_change_lo": ch["lo"], "accuracy_change_hi": ch["hi"], "flip_rate": c["flip_rate"],
                         "causal_survival": c["causal_survival"], "effect_retained": eff.get("value"),
                         "detection_auroc_confidence": c["detection_auroc"]["confidence_drop"], "failed": c["failed"]})
        return pd.DataFrame(rows)


def default_candidates(ev_cfg: TaskConfig, labels: list[str], seed: int) -> list[Candidate]:
    out = [Candidate(name=n, template=t) for n, t in template_variants(ev_cfg.template, labels, seed).items()]
    k = ev_cfg.shots
    out += [Candidate(name="demos_removed" if k else "demos_added", shots=0 if k else len(labels)),
            Candidate(name="demos_changed", shots=max(k, len(labels)), demo_seed=seed + 101)]
    out += [Candidate(name=f"text_{t}", text=t) for t in ("lower", "upper", "whitespace", "typos")]
    out += [Candidate(name=p, precision=p) for p in PRECISIONS if p != "float32"]
    return out


PARITY = "llama.cpp_F32"
"""The candidate every llama.cpp row is read beside: the reference's own weights (F32 GGUF) in llama.cpp, so a row
separates llama.cpp's arithmetic (activations quantized for its dot products, f16 KV cache, its attention) from
the bits of its weights."""


def candidates(cfg: AuditConfig, ev_cfg: TaskConfig, labels: list[str]) -> list[Candidate]:
    """The candidates an audit runs: the configured ones (or the defaults), with the llama.cpp parity candidate first
    when some candidate runs in llama.cpp and none is the reference's weights there already."""
    cands = default_candidates(ev_cfg, labels, cfg.seed) if cfg.candidates == "default" else list(cfg.candidates)
    runtime = [c for c in cands if c.runtime == "llama.cpp"]
    if runtime:
        llamacpp.version()  # the extra is installed, or one line naming the install command
        if not any(_is_parity(c) for c in runtime):
            cands.insert(cands.index(runtime[0]), Candidate(name=PARITY, runtime="llama.cpp"))
    return cands


def _is_parity(c: Candidate) -> bool:
    plain = c.template is None and c.shots is None and c.demo_seed is None and c.text is None
    return plain and c.model is None and c.kv_cache in (None, "f16") and c.precision in (None, "llama.cpp:F32")


def _attach_parity(rows: list[dict]):
    """Each llama.cpp row gets the parity row's flips and largest label log-prob change beside its own."""
    par = next((r for r in rows if r.get("runtime") and r.get("parity_of_runtime")), None)
    for r in rows:
        if r.get("runtime") and par is not None:
            r["parity"] = {"candidate": par["name"], "flip_rate": par["flip_rate"],
                           "label_logp_max_change": par["label_logp_max_change"],
                           "accuracy_change": par["accuracy_change"]["value"]}


@dataclass
class _Reference:
    """The reference every candidate is compared with, and what the comparison needs."""
    task: Task
    saes: dict  # layer -> SAE
    cfg: AuditConfig
    texts: list[str]
    y: np.ndarray
    labels: list[str]
    obs: dict  # the reference's observation (see _observe)
    causal: dict[str, list[list[int]]]
    phase_of: dict[int, int]
    n_phases: int
    boots: np.ndarray
    unrelated: dict[int, float]
    abl_idx: dict[str, np.ndarray]


def audit(task: Task, saes: dict, evaluation: EvalResult, phases: PhasesResult | None = None,
          trace: TraceResult | None = None, config: AuditConfig | dict | None = None,
          load_model: Callable[[str | None], ModelView] | None = None, progress=None) -> AuditResult:
    """Compare every candidate with the reference on the evaluated examples. Precision candidates change
    the task's model in place and restore it bit for bit (one model in memory); `load_model(name)` loads
    the checkpoint of a `model` candidate (default: float32, on the reference's device)."""
    cfg = config if isinstance(config, AuditConfig) else validated(AuditConfig, config or {}, "audit.")
    require(task.model, "audit")
    ref = _reference(task, saes, evaluation, phases, trace, cfg)
    load_view = load_model or _reloader(task.model)
    cands = candidates(cfg, task.config, ref.labels)
    rows = []
    for cand in cands:
        rows.append(_compare(cand, ref, load_view))
        if progress:
            progress(1)
    _attach_parity(rows)
    view = task.model
    data = {"stage": "audit", "config_hash": config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
            "model": view.name, "labels": ref.labels, "n": int(len(ref.y)), "seed": cfg.seed, "n_phases": ref.n_phases,
            "reference_accuracy": float((ref.obs["pred"] == ref.y).mean()),
            "reference": {"weights": view.weights or "a model built in memory, run in "
                                                     + str(view.dtype).replace("torch.", "")},
            "candidates": rows,
            "unrelated_drift": {str(layer): v for layer, v in ref.unrelated.items()},
            "failed": [r["name"] for r in rows if r["failed"]]}
    return AuditResult(data)


def _quantized(view: ModelView, spec: str) -> ModelView:
    """The reference's weights, loaded where it runs, quantized by a library on load."""
    settings = view.settings or ModelConfig(name=view.path or view.name, device=str(view.device))
    return load_model(settings.model_copy(update={"quantization": spec, "device_map": None}))


def _reloader(view: ModelView) -> Callable[[str], ModelView]:
    """Loads a `model` candidate where and as the reference was loaded (float32 unless told otherwise)."""
    def load(name: str) -> ModelView:
        settings = view.settings or ModelConfig(device=str(view.device))
        return load_model(settings.model_copy(update={"name": name, "dtype": "float32"}))
    return load


def _reference(task, saes, evaluation, phases, trace, cfg) -> _Reference:
    preds, labels = evaluation.predictions, evaluation.labels
    texts, y = list(preds.text), np.array([labels.index(g) for g in preds.gold])
    by_layer = residual_by_layer(saes, "audit")
    phase_of = phases.phase_of_layer if phases is not None else {}
    n_phases = max(phase_of.values()) + 1 if phase_of else 1
    causal = (_checked_features(cfg.causal_features, labels, by_layer) if cfg.causal_features
              else _causal_sets(trace, phases))
    obs = _observe(task, texts, by_layer)
    pick = np.random.default_rng(cfg.seed + 2)
    abl_idx = {lab: np.sort(pick.permutation(np.flatnonzero(y == e))[:cfg.ablation_per_emotion])
               for e, lab in enumerate(labels)}
    obs["effects"] = _ablation_effects(task, texts, by_layer, causal, labels, abl_idx)
    # drift baseline per layer: 1 - top-k Jaccard between each reference example and another one. Layers
    # differ in how example-specific their codes are, so raw drift grows with depth for any change;
    # drift / unrelated is the fraction of the way to an unrelated input.
    order = derangement(len(texts), cfg.seed + 1)
    unrelated = {layer: float(1 - jaccard_topk(obs["codes"][layer], obs["codes"][layer][order], cfg.top_k).mean())
                 for layer in by_layer}
    boots = np.random.default_rng(cfg.seed).integers(0, len(y), (cfg.n_boot, len(y)))
    return _Reference(task, by_layer, cfg, texts, y, labels, obs, causal, phase_of, n_phases, boots, unrelated, abl_idx)


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


def _observe(task: Task, texts: list[str], saes: dict) -> dict:
    """Calibrated predictions and probabilities, and SAE codes at the answer position of every layer."""
    prompts = task.encode_all(texts)
    # the label scores and every SAE layer's answer-position residual from the same forwards
    logp, res = score_ids(task.model, prompts, task.label_ids, task.config.batch_size, resid_layers=list(saes))
    cal = calibrate.apply_prior(logp, task.log_prior())
    with torch.no_grad():
        codes = {layer: np.nan_to_num(sae.encode(torch.from_numpy(res[layer]).to(sae.W_dec)).cpu().numpy(), nan=0.0,
                                      posinf=0.0, neginf=0.0) for layer, sae in saes.items()}
    # a candidate can overflow (Gemma in float16 does): such rows count as maximally uncertain and wrong
    bad = ~np.isfinite(cal).all(1)
    cal = np.where(bad[:, None], -np.log(cal.shape[1]), cal)
    return {"cal": cal, "pred": cal.argmax(1), "codes": codes, "prompts": prompts, "non_finite": bad, "logp": logp,
            "resid": res}


def _ablation_effects(task: Task, texts, saes, causal, labels, idx) -> dict[str, np.ndarray]:
    """Per emotion: the drop in its calibrated best-other margin on its chosen examples when its causal
    set is zeroed at the answer position (SAE error kept). Non-finite margins (an overflowing
    candidate) count as no effect."""
    view, tokens = task.model, task.label_tokens
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
        m = ablate_each(view, saes, prompts, gold, tokens, sets, prior)
    except EmoscopeError:  # non-finite activations: the candidate overflows
        m = np.full((len(sets), len(prompts)), np.nan)
    return {lab: np.nan_to_num(m[0, rows[lab]] - m[j, rows[lab]], nan=0.0, posinf=0.0, neginf=0.0)
            for j, lab in enumerate(feats, 1)}


def _causal_sets(trace: TraceResult | None, phases: PhasesResult | None) -> dict[str, list[list[int]]]:
    """Causal features per emotion: tracing's chosen sets, else the phases stage's top features. An emotion whose
    sets are empty (no small set removed half its margin: SmolLM2's quick trace) keeps the traced features whose
    own ablation's interval lies above the random control's, so its causal features are still audited."""
    if trace is not None:
        return {lab: _traced(e) for lab, e in trace["emotions"].items()}
    if phases is not None:
        return {lab: [[f["layer"], f["feature"]] for f in fs] for lab, fs in phases["top_features"].items()}
    return {}


def _traced(emotion: dict) -> list[list[int]]:
    chosen = [f for p in emotion["phases"].values() for f in p["set"]]
    if chosen:
        return chosen
    return [[f["layer"], f["feature"]] for p in emotion["phases"].values() if p.get("random_control")
            for f in p["features"] if f["effect"]["lo"] > p["random_control"]["hi"]]


@contextmanager
def candidate_task(cand: Candidate, task: Task, texts: list[str], cfg: AuditConfig, load_view=None):
    """Within the block: the candidate's task (prompt, demonstrations, model) and input texts (`texts` with the
    candidate's noise), and what was done to the model. A precision change applies to the reference task's loaded
    weights in place and is undone afterwards (one model in memory); a `model` candidate is loaded beside it."""
    base = task.model
    view, weights, load_view = base, {}, load_view or _reloader(base)
    if cand.runtime == "llama.cpp":
        view = _llamacpp_view(cand, base)
        weights = {"weights": view.weights, **view.describe(), "parity_of_runtime": _is_parity(cand)}
    elif cand.model is not None or (cand.precision or "").startswith("llama.cpp:"):
        # llama.cpp's quantized file dequantised into PyTorch: the same bits in float arithmetic (its emulation)
        path = str(_llamacpp_file(cand, base)) if cand.model is None else cand.model
        view = load_view(path)
        if view.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise EmoscopeError(f"candidate {cand.name}: {cand.model} has another tokenizer than the reference; "
                                "features could not be aligned, so it cannot be audited against it")
        weights = {"weights": view.weights or cand.model}  # e.g. the Q4_K_M GGUF a team ships
    changes = {k: v for k, v in (("template", cand.template), ("shots", cand.shots), ("seed", cand.demo_seed))
               if v is not None}
    if cand.text is not None:
        r = random.Random(cfg.seed)
        texts = [perturb_text(t, cand.text, r) for t in texts]
    if cand.runtime == "llama.cpp":
        variant = task.variant(model=view, **changes)
        view.check_tokens([variant.prompt(t) for t in texts], variant.encode_all(texts),
                          variant.builder.label_strings(), variant.label_ids)
    if cand.precision in LIBRARY:  # the library's own kernels: the reference's weights loaded quantized
        if cand.model is not None:
            raise EmoscopeError(f"candidate {cand.name}: give a model file or a library precision, not both")
        view = _quantized(base, cand.precision)
        q = quantization.describe(view.model, cand.precision)
        weights = {"weights": view.weights, "library": q["library"], "kernels": q["kernels"]}
    simulated = cand.precision and cand.precision not in LIBRARY and not cand.precision.startswith("llama.cpp:")
    precision = precision_applied(view, cand.precision, cfg.group_size) if simulated else nullcontext({})
    emulated_kv = cand.kv_cache and cand.runtime != "llama.cpp"  # llama.cpp's own cache is set on its context
    kv = kv_cache_quantized(view, cand.kv_cache) if emulated_kv else nullcontext({})
    with precision as info, kv as kv_info:
        yield task.variant(model=view, **changes), texts, {**weights, **info, **kv_info}


def _llamacpp_view(cand: Candidate, base: ModelView):
    """The candidate's GGUF in llama.cpp, fed the reference's token ids: a file as shipped, or the reference's own
    weights as an F32 GGUF (the same metadata and tensor names as its source file), quantized by llama.cpp."""
    path = Path(cand.model).expanduser() if cand.model not in (None, SOURCE) else _llamacpp_file(cand, base)
    return llamacpp.LlamaCppModel(path, base.tokenizer, base.name, base.chat, cand.threads, cand.kv_cache)


def _llamacpp_file(cand: Candidate, base: ModelView) -> Path:
    """The reference's GGUF as shipped (`model: source`), or its weights as an F32 GGUF quantized by llama.cpp to
    the candidate's type (cached by content)."""
    name = base.settings.name if base.settings is not None else base.name
    source = gguf_source(name)
    if source is None:
        raise EmoscopeError(f"candidate {cand.name}: a llama.cpp build of the reference needs the reference loaded "
                            f"from a GGUF file or a registry model, and '{name}' is neither (convert it with "
                            "llama.cpp's convert_hf_to_gguf.py and audit the file as `model:`)")
    if cand.model == SOURCE:
        return source[0]
    path = llamacpp.write_float_gguf(source[0])
    ftype = (cand.precision or "llama.cpp:F32").split(":", 1)[1]
    return path if ftype == "F32" else llamacpp.quantize(path, ftype, cand.threads)


def _compare(cand: Candidate, ref: _Reference, load_view) -> dict:
    with candidate_task(cand, ref.task, ref.texts, ref.cfg, load_view) as (task, texts, info):
        cur = _observe(task, texts, ref.saes)
        cur["effects"] = _ablation_effects(task, texts, ref.saes, ref.causal, ref.labels, ref.abl_idx)
    return _verdict(cand, ref, cur, info)


def _verdict(cand: Candidate, ref: _Reference, cur: dict, info: dict) -> dict:
    """The candidate's row: accuracy and flips, drift, causal survival and effect retained, detection, failed."""
    y, labels = ref.y, ref.labels
    cur["pred"] = np.where(cur["non_finite"], (y + 1) % len(labels), cur["pred"])  # never the gold label
    acc = _accuracy(ref, cur)
    drift = _drift(ref, cur)
    survival, fdrift, total = _survival(ref, cur)
    effect = retained(ref.obs["effects"], cur["effects"], np.random.default_rng(ref.cfg.seed + 3), ref.cfg.n_boot)
    flipped = ref.obs["pred"] != cur["pred"]
    t = ref.cfg.thresholds
    failed = (cur["non_finite"].any() or (-acc["accuracy_change"]["value"] > t.max_accuracy_drop)
              or (flipped.mean() > t.max_flip_rate) or (survival is not None and survival < t.min_causal_survival)
              or (t.min_effect_retained is not None and effect is not None and effect["value"] < t.min_effect_retained))
    changed = cand.model_dump(mode="json", exclude_none=True, exclude={"name"})
    return {"name": cand.name, "changed": changed, **info, **acc, **drift, "causal_survival": survival,
            "label_logp_max_change": _logp_change(ref, cur), "resid_rel_change": _resid_change(ref, cur),
            "causal_effect": effect, "detection_auroc": _detection(ref, cur, flipped, fdrift if total else None),
            "failed": bool(failed)}


def _logp_change(ref: _Reference, cur: dict) -> float | None:
    """Largest change of any label's summed log-prob on any example (None when the texts differ: not comparable)."""
    d = np.abs(cur["logp"] - ref.obs["logp"])
    return float(d[np.isfinite(d)].max()) if cur["prompts"] == ref.obs["prompts"] and np.isfinite(d).any() else None


def _resid_change(ref: _Reference, cur: dict) -> dict[str, float] | None:
    """Per SAE layer, ||candidate - reference|| / ||reference|| of the answer-position residuals over all examples
    (None when the prompts differ)."""
    if cur["prompts"] != ref.obs["prompts"]:
        return None
    return {str(layer): float(np.linalg.norm(np.nan_to_num(cur["resid"][layer] - r)) / max(np.linalg.norm(r), 1e-12))
            for layer, r in ref.obs["resid"].items()}


def _accuracy(ref: _Reference, cur: dict) -> dict:
    """Accuracy and its change with a paired bootstrap interval, macro-F1 change, flips, recall changes."""
    y, labels = ref.y, ref.labels
    acc_r, acc_c = (ref.obs["pred"] == y), (cur["pred"] == y)
    boot_d = acc_c[ref.boots].mean(1) - acc_r[ref.boots].mean(1)
    m_r = classification_metrics(y, ref.obs["pred"], labels, 200)
    m_c = classification_metrics(y, cur["pred"], labels, 200)
    return {"accuracy": float(acc_c.mean()), "non_finite_frac": float(cur["non_finite"].mean()),
            "accuracy_change": {"value": float(acc_c.mean() - acc_r.mean()), "lo": float(np.percentile(boot_d, 2.5)),
                                "hi": float(np.percentile(boot_d, 97.5))},
            "macro_f1_change": m_c["macro_f1"]["value"] - m_r["macro_f1"]["value"],
            "flip_rate": float((ref.obs["pred"] != cur["pred"]).mean()),
            "recall_change": {lab: m_c["per_class"][lab]["recall"]["value"] - m_r["per_class"][lab]["recall"]["value"]
                              for lab in labels}}


def _drift(ref: _Reference, cur: dict) -> dict:
    """Feature drift per layer (raw and normalised by unrelated-input drift), per phase, final phase's excess."""
    drift, per_ex = {}, {}
    for layer in sorted(ref.saes):
        a, b = ref.obs["codes"][layer], cur["codes"][layer]
        per_ex[layer] = 1 - jaccard_topk(a, b, ref.cfg.top_k)
        jac = float(1 - per_ex[layer].mean())
        u = ref.unrelated[layer]
        drift[layer] = {"corr": float(rowcorr(a, b).mean()), "jaccard": jac,
                        "normalized": (1 - jac) / u if u > 0 else (0.0 if jac == 1 else None),
                        "phase": int(ref.phase_of.get(layer, 0))}
    by_phase_raw = {p: float(np.mean([1 - d["jaccard"] for d in drift.values() if d["phase"] == p] or [np.nan]))
                    for p in range(ref.n_phases)}
    by_phase, excess = phase_drift(per_ex, ref.unrelated, {layer: d["phase"] for layer, d in drift.items()},
                                   ref.n_phases, ref.boots)
    return {"drift": {str(layer): d for layer, d in drift.items()},
            "drift_by_phase": {str(p): v for p, v in by_phase.items()},
            "drift_by_phase_raw": {str(p): v for p, v in by_phase_raw.items()},
            "final_phase_excess": excess,
            "final_phase_drifts_most": bool(excess is not None and excess["value"] >= 0)}


def _survival(ref: _Reference, cur: dict) -> tuple[float | None, np.ndarray, int]:
    """Share of the reference's causal features still active where they were active, and each example's
    causal-feature drift score."""
    alive, total, fdrift = 0, 0, np.zeros(len(ref.y))
    for e, lab in enumerate(ref.labels):
        feats = ref.causal.get(lab, [])
        idx = np.flatnonzero(ref.y == e)
        for layer, f in feats:
            if layer not in ref.saes:
                continue
            a, b = ref.obs["codes"][layer][idx, f], cur["codes"][layer][idx, f]
            on = a > 0
            total += int(on.sum())
            alive += int((b > 0)[on].sum())
            fdrift[idx] += np.abs(a - b) / (np.abs(a) + 1e-6) / max(len(feats), 1)
    return (alive / total if total else None), fdrift, total


def _detection(ref: _Reference, cur: dict, flipped: np.ndarray, fdrift: np.ndarray | None) -> dict:
    """AUROC with which output-side signals, and causal-feature drift, flag the flipped examples."""
    rc, cc = ref.obs["cal"], cur["cal"]
    def ent(c):
        return -(np.exp(c) * c).sum(1)
    def margin(c):
        return np.sort(c, 1)[:, -1] - np.sort(c, 1)[:, -2]
    return {"confidence_drop": auroc_or_none(rc.max(1) - cc.max(1), flipped),
            "entropy_rise": auroc_or_none(ent(cc) - ent(rc), flipped),
            "margin_drop": auroc_or_none(margin(rc) - margin(cc), flipped),
            "causal_feature_drift": auroc_or_none(fdrift, flipped) if fdrift is not None else None}
