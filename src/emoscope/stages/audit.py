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

from typing import TYPE_CHECKING

from typing import Callable

import pandas as pd

from .. import profiling
from ..artifacts import config_hash
from ..backends.base import require
from ..deployment import kld
from ..deployment.candidates import Candidate, candidates, candidate_task, is_parity, reference_in_llamacpp, reloader
from ..deployment.config import AuditConfig, Thresholds  # noqa: F401  (Thresholds: part of the stage's API)
from ..deployment.reference import AuditRow, Reference
from ..errors import validated
from ..task import Task
from .base import Stage, StageResult
from .evaluate import EvalResult
from .phases import PhasesResult
from .trace import TraceResult

if TYPE_CHECKING:
    from ..backends.transformers import ModelView


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


def audit(task: Task, saes: dict, evaluation: EvalResult, phases: PhasesResult | None = None,
          trace: TraceResult | None = None, config: AuditConfig | dict | None = None,
          load_model: Callable[[str | None], ModelView] | None = None, progress=None,
          reference: Reference | None = None) -> AuditResult:
    """Compare every candidate with the reference on the evaluated examples. Precision candidates change
    the task's model in place and restore it bit for bit (one model in memory); `load_model(name)` loads
    the checkpoint of a `model` candidate (default: float32, on the reference's device). `reference`: the reference
    already measured with this config (layer sensitivity audits many files against one)."""
    cfg = config if isinstance(config, AuditConfig) else validated(AuditConfig, config or {}, "audit.")
    require(task.model, "audit")
    ref = reference or Reference.measure(task, saes, evaluation, phases, trace, cfg)
    load_view = load_model or reloader(task.model)
    cands = candidates(cfg, task.config, ref.labels)
    _kld_bases(cands, ref)
    rows = []
    for cand in cands:
        rows.append(compare(cand, ref, load_view))
        if progress:
            progress(1)
    attach_parity(rows)
    view = task.model
    data = {"stage": "audit", "config_hash": config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
            "model": view.name, "labels": ref.labels, "n": int(len(ref.y)), "seed": cfg.seed, "n_phases": ref.n_phases,
            "reference_accuracy": ref.accuracy,
            "reference": {"weights": view.weights or "a model built in memory, run in "
                                                     + str(view.dtype).replace("torch.", "")},
            "candidates": rows,
            "unrelated_drift": {str(layer): v for layer, v in ref.unrelated.items()},
            "failed": [r["name"] for r in rows if r["failed"]]}
    return AuditResult(data)


def compare(cand: Candidate, ref: Reference, load_view=None) -> AuditRow:
    """One candidate built from the reference's task, observed on the reference's examples, and its row."""
    with candidate_task(cand, ref.task, ref.texts, ref.cfg, load_view) as (task, texts, info):
        cur = ref.observe(task, texts)
        figures = _kld(cand, ref, task.model)
    row = ref.row(cand, cur, info)
    if ref.cfg.kld is not None:
        row["kld"] = figures
    return row


def _kld_bases(cands: list[Candidate], ref: Reference) -> None:
    """The reference's stored next-token log-probs in every runtime a measured candidate runs in, before any
    candidate changes the reference's weights in place: PyTorch's from the reference itself, llama.cpp's from its
    F32 GGUF there."""
    cfg = ref.cfg.kld
    measured = [c for c in cands if cfg is not None and c.changes_model and not is_parity(c)]
    runtimes = {c.runtime or "transformers": c for c in measured}
    if runtimes:
        wins = kld.windows(ref.task.model.tokenizer, cfg, ref.task.config.data.data_dir)
    for runtime, cand in runtimes.items():
        if runtime not in ref.kld_bases:
            base = ref.task.model if runtime == "transformers" else reference_in_llamacpp(ref.task.model, cand.threads)
            with profiling.section("kld"):
                ref.kld_bases[runtime] = kld.base(base, wins)


def _kld(cand: Candidate, ref: Reference, model) -> dict | None:
    """llama-perplexity's statistics of the candidate's model against the reference in the same runtime (None for a
    prompt-only candidate, whose model is the reference's, and for the parity row, which is the llama.cpp base)."""
    if ref.cfg.kld is None or not cand.changes_model or is_parity(cand):
        return None
    with profiling.section("kld"):
        return kld.measure(ref.kld_bases[model.backend], model)._asdict()


def attach_parity(rows: list[dict]):
    """Each llama.cpp row gets the parity row's flips and largest label log-prob change beside its own."""
    par = next((r for r in rows if r.get("runtime") and r.get("parity_of_runtime")), None)
    for r in rows:
        if r.get("runtime") and par is not None:
            r["parity"] = {"candidate": par["name"], "flip_rate": par["flip_rate"],
                           "label_logp_max_change": par["label_logp_max_change"],
                           "accuracy_change": par["accuracy_change"]["value"]}


def _run(ctx, cfg: AuditConfig, progress, workdir) -> AuditResult:
    return audit(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.optional("phases"), ctx.optional("trace"), cfg,
                 progress=progress)


def _total(ctx, cfg: AuditConfig) -> int | None:
    return len(cfg.candidates) if isinstance(cfg.candidates, list) else None  # 'default': expanded by the task


STAGE = Stage("audit", AuditConfig, AuditResult, upstream=("phases", "trace"), needs=("evaluate", "saes"), run=_run,
              total=_total,
              printer="print_audit", summary="Compare the reference with candidate prompts, precisions, runtimes and "
                                             "files: a deployment gate (reads phases and trace when present).")
