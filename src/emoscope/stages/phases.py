"""Stage `phases`: read the model layer by layer through its SAEs on the evaluated examples, find the
phases, and the shared vs emotion-specific features (claims 1 and 2).

`phases(task, saes, evaluation)` returns a `PhasesResult`: the per-layer table for all examples and
for correctly classified ones, phase fits for 1-5 phases, the chosen phases with subsample intervals,
the share of emotion-selective features in the last phase, shared/specific counts, emotion overlap,
top features with examples and promoted tokens (`result.json`), the selectivity of every selective
layer x feature x emotion (`features.parquet`), and the activation stores it read (`store_last/`,
`store_text/`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..backends.base import require
from .. import profiling
from ..analysis.layers import layer_row, selectivity, text_scores
from ..analysis.phases import SEGMENT_STATS, boundary_intervals, fit_phases, name_phases, phase_of
from ..analysis.stats import interval, linear_cka, probe_accuracy
from ..artifacts import config_hash
from ..errors import EmoscopeError, validated
from ..hooks import HookPoint
from ..sae.cards import STORES, capture_examples, card_key, feature_cards
from ..store import Store
from ..task import Task
from .base import Estimate, Stage, StageResult
from .evaluate import EvalResult
from ..constraints import Seed


class PhasesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    fdr: float = Field(0.05, gt=0, lt=1)
    """False-discovery rate for emotion-selective features (BH over features x emotions)."""
    min_auroc: float = Field(0.7, ge=0.5, le=1)
    """Smallest one-vs-rest AUROC that counts as selective (effect size)."""
    min_per_class: int = Field(10, ge=2)
    """Fewest examples per emotion needed to analyse a subset."""
    n_boot: int = Field(100, ge=10)
    """Resamples (80% subsamples without replacement) for boundary and share intervals."""
    max_phases: int = Field(5, ge=2)
    """Largest number of phases fitted."""
    min_gain: float = Field(0.2, gt=0, lt=1)
    """Each added phase must explain this share of the 1-phase residual."""
    probe_folds: int = Field(5, ge=2)
    """Cross-validation folds of the linear probes."""
    text_features: int = Field(256, ge=8)
    """Most variable features per layer used for the text-token scores."""
    top_features: int = Field(5, ge=1)
    """Top features per emotion described with examples and tokens."""
    seed: Seed = 0
    """Seed for bootstrap, probes and label shuffles."""


class PhasesResult(StageResult):
    """Phases of the layer-wise flow: `n_phases`, `boundaries`, `phase_of_layer`, `last_phase_share`,
    the per-layer table (`to_frame()`) and the selective features (`features`)."""

    stage = "phases"
    table_names = ("features",)
    workdir: Path | None = None  # where the activation stores were written

    @property
    def n_phases(self) -> int:
        return self.data["n_phases"]

    @property
    def boundaries(self) -> list[int]:
        """First layer of each phase after the first."""
        return [b["layer"] for b in self.data["boundaries"]]

    @property
    def phase_of_layer(self) -> dict[int, int]:
        return {HookPoint.parse(h).layer: p for h, p in self.data["phase_of_layer"].items()}

    @property
    def last_phase_share(self) -> Estimate:
        return Estimate.of(self.data["last_phase_share"])

    @property
    def features(self) -> pd.DataFrame:
        return self.tables["features"]

    def to_frame(self, subset: str = "all") -> pd.DataFrame:
        """One row of statistics per layer (`all` examples or the `correct` ones)."""
        return pd.DataFrame(self.data["layers"][subset])

    @property
    def stores(self) -> tuple[Store, Store] | None:
        """The (final token, text tokens) activation stores of the evaluated examples at every SAE hook,
        where they were kept (a fresh result's work folder, or the folder it was loaded from)."""
        if self.workdir is None or not all((self.workdir / n / "manifest.json").is_file() for n in STORES):
            return None
        return tuple(Store(self.workdir / n) for n in STORES)

    @classmethod
    def load(cls, folder: str | Path) -> "PhasesResult":
        res = super().load(folder)
        res.workdir = Path(folder)
        return res

    def _write(self, folder: Path) -> None:
        for name in STORES:
            if self.workdir is not None and (self.workdir / name).is_dir():
                shutil.copytree(self.workdir / name, folder / name, copy_function=_link_or_copy)
        super()._write(folder)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows one (the stores can be large), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class _Inputs:
    """What the per-layer analysis reads: labels, gold ids, correctness, the text-token index."""
    labels: list[str]
    y: np.ndarray
    correct: np.ndarray
    tok_ids: np.ndarray
    ex_idx: np.ndarray
    first_tokens: list[int]
    boots: list[np.ndarray]


def phases(task: Task, saes: dict, evaluation: EvalResult, config: PhasesConfig | dict | None = None,
           progress=None, workdir: str | Path | None = None) -> PhasesResult:
    """Per-layer statistics, the phases and the shared vs specific features on the evaluated examples.
    `saes`: hook name -> SAE; the activation stores go to `workdir` (default: a temporary folder)."""
    cfg = config if isinstance(config, PhasesConfig) else validated(PhasesConfig, config or {}, "phases.")
    require(task.model, "phases")
    view, preds, labels = task.model, evaluation.predictions, evaluation.labels
    _check_counts(preds, labels, cfg)
    hooks = sorted((HookPoint.parse(h) for h in saes), key=lambda h: h.layer)
    rng = np.random.default_rng(cfg.seed)
    y = np.array([labels.index(g) for g in preds.gold])
    # Subsamples without replacement, not the bootstrap: duplicated examples would make the rank tests
    # behind selectivity anti-conservative. 80% subsamples give conservative (wider) intervals.
    boots = [np.sort(rng.choice(len(y), int(0.8 * len(y)), replace=False)) for _ in range(cfg.n_boot)]
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="emoscope-phases-"))
    last, text = capture_examples(task, evaluation.examples(), hooks, work)
    inp = _Inputs(labels, y, preds.correct_cal.to_numpy(), text.read("token_ids").numpy(),
                  text.read("example_idx").numpy(), task.label_tokens, boots)
    rows = {"all": [], "correct": []}
    boot_S = np.zeros((cfg.n_boot, len(hooks), len(SEGMENT_STATS)))
    sel_all, prev = [], None
    for li, hp in enumerate(hooks):
        resid = last.read(hp.name).float().numpy()
        codes = _encode(saes[hp.name], resid)
        ct = _encode(saes[hp.name], text.read(hp.name).float().numpy())
        ct = ct[:, np.argsort(-ct.var(0))[:cfg.text_features]]
        p_gold, lens_hit = _lens(view, resid, inp.first_tokens, y)
        for subset, row, sel in _layer_rows(hp, view, cfg, inp, codes, ct, resid, prev, p_gold, lens_hit):
            rows[subset].append(row)
            if subset == "all":
                sel_all.append(sel)
        boot_S[:, li] = _boot_stats(cfg, inp, codes, ct, resid, prev, p_gold)
        prev = resid
        if progress:
            progress(1)
    data, ph = _summary(cfg, view, hooks, inp, rows, boot_S)
    data.update(_features(sel_all, hooks, labels, ph, saes, task, evaluation, (last, text), cfg))
    result = PhasesResult(data, {"features": _feature_table(hooks, sel_all, labels)})
    result.workdir = work
    if workdir is None:
        weakref.finalize(result, shutil.rmtree, work, True)
    return result


def _check_counts(preds: pd.DataFrame, labels: list[str], cfg: PhasesConfig) -> None:
    counts = preds.gold.value_counts()
    short = {c: int(counts.get(c, 0)) for c in labels if counts.get(c, 0) < cfg.min_per_class}
    if short:
        raise EmoscopeError(f"too few examples per emotion for the phases analysis (need {cfg.min_per_class}): {short}")


def _layer_rows(hp, view, cfg, inp: _Inputs, codes, ct, resid, prev, p_gold, lens_hit):
    """(subset, row, selectivity) for all examples and for the correct ones, where each emotion has enough."""
    E = len(inp.labels)
    for subset, mask in [("all", np.ones(len(inp.y), bool)), ("correct", inp.correct)]:
        y = inp.y[mask]
        if min(np.bincount(y, minlength=E)) < cfg.min_per_class:
            continue  # reported as missing for this subset
        tmask = mask[inp.ex_idx]
        row, sel = layer_row(hp.layer, codes[mask], ct[tmask], resid[mask], prev[mask] if prev is not None else None,
                             inp.tok_ids[tmask], inp.ex_idx[tmask], y, E, cfg.fdr, cfg.min_auroc)
        folds = min(cfg.probe_folds, int(np.bincount(y).min()))
        row.update(depth=(hp.layer + 1) / view.n_layers, hook=hp.name, lens_gold_prob=float(p_gold[mask].mean()),
                   lens_acc=float(lens_hit[mask].mean()),
                   probe_resid=probe_accuracy(resid[mask], y, folds, cfg.seed),
                   probe_resid_shuffled=probe_accuracy(resid[mask], y, folds, cfg.seed, shuffle_labels=True),
                   probe_codes=probe_accuracy(codes[mask], y, folds, cfg.seed),
                   probe_codes_shuffled=probe_accuracy(codes[mask], y, folds, cfg.seed, shuffle_labels=True))
        yield subset, row, sel


@profiling.timed("statistics:subsamples")
def _boot_stats(cfg, inp: _Inputs, codes, ct, resid, prev, p_gold) -> np.ndarray:
    """The segmented statistics of one layer, recomputed on each subsample of examples [n_boot, stats]."""
    out = np.zeros((len(inp.boots), len(SEGMENT_STATS)))
    for b, idx in enumerate(inp.boots):
        s = selectivity(codes[idx], inp.y[idx], len(inp.labels), cfg.fdr, cfg.min_auroc)
        tm = np.isin(inp.ex_idx, idx)
        sf, sm = text_scores(ct[tm], inp.tok_ids[tm], inp.ex_idx[tm])
        out[b] = [sf, sm, float((s.n_emotions > 0).mean()), float(p_gold[idx].mean()),
                  linear_cka(prev[idx], resid[idx]) if prev is not None else np.nan]
    return out


def _summary(cfg, view, hooks, inp: _Inputs, rows: dict, boot_S: np.ndarray) -> tuple[dict, np.ndarray]:
    """Phase fits, the chosen phases with intervals, and the last phase's share of selective features."""
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
    data = {
        "stage": "phases", "config_hash": config_hash(cfg, view.name), "config": cfg.model_dump(mode="json"),
        "model": view.name, "n_layers": view.n_layers, "labels": inp.labels, "n": int(len(inp.y)),
        "n_correct": int(inp.correct.sum()), "seed": cfg.seed, "hooks": [h.name for h in hooks], "layers": rows,
        "fits": {str(kk): {**v, "boundary_depths": [b_ / len(hooks) for b_ in v["boundaries"]]}
                 for kk, v in fit["fits"].items()},
        "criterion": fit["criterion"], "n_phases": k,
        "boundaries": [{"layer": int(hooks[b_].layer), "depth": hooks[b_].layer / view.n_layers, **ci}
                       for b_, ci in zip(bnd, boundary_intervals(boot_b, len(hooks)))],
        "phase_names": name_phases(S, SEGMENT_STATS, bnd),
        "phase_of_layer": {h.name: int(p) for h, p in zip(hooks, ph)},
        "last_phase_share": {**interval(share, boot_share), "n_boot": cfg.n_boot},
    }
    return data, ph


def _feature_table(hooks, sels, labels) -> pd.DataFrame:
    rows = [{"layer": h.layer, "feature": int(f), "emotion": labels[e], "auroc": float(s.auroc[f, e]),
             "p_adj": float(s.p_adj[f, e])}
            for h, s in zip(hooks, sels) for f, e in zip(*np.nonzero(s.selective))]
    return pd.DataFrame(rows, columns=["layer", "feature", "emotion", "auroc", "p_adj"])


def _lens(view, resid: np.ndarray, first_tokens: list[int], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit lens at the final token, per example: P(gold) renormalised over the labels' first tokens,
    and whether the gold label is the lens's top label."""
    with torch.no_grad():
        lp = torch.log_softmax(view.logits_from_resid(torch.from_numpy(resid).to(view.device, view.dtype)).float(), -1)
    lab = torch.log_softmax(lp[:, first_tokens], -1).cpu().numpy()
    return np.exp(lab[np.arange(len(y)), y]), lab.argmax(1) == y


def _encode(sae, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    dev = sae.W_dec.device
    with torch.no_grad():
        return np.concatenate([sae.encode(torch.from_numpy(x[i:i + batch]).float().to(dev)).cpu().numpy()
                               for i in range(0, len(x), batch)])


def _features(sels, hooks, labels, ph, saes, task, evaluation, stores, cfg) -> dict:
    """Shared vs specific features per emotion and phase, emotion overlap (Jaccard), top features and
    their cards (read from the stores of this stage's capture)."""
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
    chosen = {lab: sorted(((s.auroc[f, e], li, int(f)) for li, s in enumerate(sels)
                           for f in np.flatnonzero(s.selective[:, e])), reverse=True)[:cfg.top_features]
              for e, lab in enumerate(labels)}
    cards = feature_cards(task, saes, [(hooks[li].name, f) for top in chosen.values() for _, li, f in top],
                          evaluation.examples(), labels, stores)
    text_of = dict(zip(evaluation.predictions.id, evaluation.predictions.text))
    top = {lab: [_top_feature(cards[card_key(hooks[li].name, f)], au, ph[li], sels[li], labels, text_of)
                 for au, li, f in feats] for lab, feats in chosen.items()}
    return {"specific_counts": specific, "shared_counts": shared, "per_phase_counts": per_phase,
            "jaccard": jac, "top_features": top, "cards": cards}


def _top_feature(card: dict, au: float, phase: int, sel, labels: list[str], text_of: dict) -> dict:
    """A top feature as the report lists it: the examples where it is most active at the answer position,
    each with the text token where it fires most (from its card)."""
    f = card["feature"]
    return {"hook": card["hook"], "layer": card["layer"], "feature": f, "auroc": float(au), "phase": int(phase),
            "emotions": [labels[j] for j in np.flatnonzero(sel.selective[f])],
            "top_examples": [{"id": ex["id"], "text": text_of[ex["id"]], "gold": ex["gold"], "activation": ex["answer"],
                              "token": {"index": ex["max_index"], "token": ex["tokens"][ex["max_index"]]
                                        if ex["max_index"] >= 0 else "", "activation": ex["max"]}}
                             for ex in card["answer_examples"]],
            "promoted_tokens": [t for t, _ in card["promoted"][:8]]}


def _run(ctx, cfg: PhasesConfig, progress, workdir) -> PhasesResult:
    return phases(ctx.task, ctx.saes, ctx.result("evaluate"), cfg, progress, workdir=workdir)


STAGE = Stage("phases", PhasesConfig, PhasesResult, upstream=("evaluate", "saes"), needs=("evaluate", "saes"),
              run=_run, printer="print_phases", total=lambda ctx, cfg: len(ctx.result("saes")["hooks"]),
              summary="Layer-wise analysis: per-layer statistics, the phases, shared vs emotion-specific features.")
