"""Benchmark: attribution screen + exact validation of the top-k per phase (as the trace stage does)
vs exhaustive exact single-feature ablation, same examples and layers. Features inactive on every
traced example have exactly zero effect under zero-ablation and are not counted. The exhaustive
baseline is timed three ways: every active feature ablated with ablate_each (many ablations per pass,
as the stage validates its candidates; measured in full, which also gives every active feature's exact
effect), one feature per pass with the same cached answer passes (the issue's baseline; a random sample
per layer, time extrapolated), and one feature per pass with whole prompts, as a straightforward
implementation runs them (sampled, extrapolated). The screen and the cached baselines pay the one-time
prefix passes (each prompt's tokens before its answer), counted on both sides. The screen (with its
prefix passes) runs three times and the median counts; the exhaustive per-ablation times are means over
many calls. The screen validates as many candidates per phase as the run's trace config. Rank correlations
of attribution and exact effect: over the validated features, over every active feature, and over the
active features whose ablation moves the answer residual by less than 5% of its norm (where first order
should hold).
Target: >= 100x faster, rank correlation >= 0.8 between attribution and exact effects.
Usage: python bench/trace.py RUN_DIR [--emotion joy] [--n 8] [--topk N] [--sample 24] [--whole 4] [--json out.json]
(RUN_DIR, default runs/demo, needs the evaluate, saes and phases stages: run `make demo` first.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from emoscope.interventions.answers import AnswerBatch, answer_batches, answer_resid, first_token_prior, prompt_batches
from emoscope.interventions.effects import ablate, ablate_each, attribution
from emoscope.pipeline import RunContext
from emoscope.stages.trace import TraceConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/demo"))
    ap.add_argument("--emotion", default=None, help="default: the emotion with most correct examples")
    ap.add_argument("--n", type=int, default=8, help="examples")
    ap.add_argument("--topk", type=int, default=None,
                    help="candidates validated exactly per phase (default: the run's trace.candidates)")
    ap.add_argument("--sample", type=int, default=24,
                    help="active features ablated exactly per layer, cached passes (extrapolated)")
    ap.add_argument("--whole", type=int, default=4,
                    help="active features ablated per layer with whole-prompt passes (extrapolated)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ctx = RunContext.from_run_dir(a.run_dir, device=a.device, dtype="float32")
    view, task, ev = ctx.model, ctx.task, ctx.result("evaluate")
    saes = ctx.result("saes").by_layer()
    preds = ev.predictions
    ok = preds[preds.correct_cal]
    lab = a.emotion or ok.gold.value_counts().index[0]
    rows = ok[ok.gold == lab].head(a.n)
    tokens = task.label_tokens
    prior = first_token_prior(task)
    prompts = task.encode_all(rows.text)
    gold = np.full(len(prompts), ev.labels.index(lab))
    if a.topk is None:
        tr = ctx.optional("trace")
        a.topk = tr["config"]["candidates"] if tr is not None else TraceConfig().candidates
    ph = ctx.optional("phases")
    phase_of = ph.phase_of_layer if ph is not None else {layer: 0 for layer in saes}

    runs = [_screen(view, saes, prompts, gold, tokens, prior, phase_of, a.topk) for _ in range(3)]
    t_prefix, t_screen = (float(np.median([r[k] for r in runs])) for k in ("prefix", "screen"))
    batches, attr, clean, est, exact_top, est_top = (runs[-1][k] for k in ("batches", "attr", "clean", "est",
                                                                            "exact_top", "est_top"))

    active = [(layer, int(f)) for layer in saes for f in np.flatnonzero(np.abs(attr[layer]).max(0) > 0)]
    t0 = time.perf_counter()
    exact_all = (clean - ablate_each(view, saes, batches, gold, tokens, [{la: [f]} for la, f in active],
                                     prior)).mean(1)
    t_exh_each = time.perf_counter() - t0 + t_prefix
    est_all = np.array([est[la][f] for la, f in active])
    small = _edit_size(view, saes, batches, tokens, active) < 0.05

    per_cached, per_whole, n_sampled, n_whole, gap = _one_per_pass(view, saes, prompts, batches, gold, tokens, prior,
                                                                   attr, clean, dict(zip(active, exact_all)), a)
    n_active = len(active)
    t_exh_cached = t_prefix + per_cached * n_active
    t_exh_whole = per_whole * n_active
    rho_top = spearmanr(est_top, exact_top).statistic
    rho_all = spearmanr(est_all, exact_all).statistic
    rho_small = spearmanr(est_all[small], exact_all[small]).statistic
    figures = {"emotion": lab, "examples": len(prompts), "layers": len(saes), "phases": len(set(phase_of.values())),
               "active_features": n_active, "validated_per_phase": a.topk, "prefix_s": round(t_prefix, 2),
               "screen_plus_validation_s": round(t_screen, 2),
               "exhaustive_each_s": round(t_exh_each, 1), "exhaustive_cached_s_extrapolated": round(t_exh_cached, 1),
               "exhaustive_whole_s_extrapolated": round(t_exh_whole, 1),
               "speedup_vs_cached_exhaustive": round(t_exh_cached / t_screen, 1),
               "speedup_vs_batched_exhaustive": round(t_exh_each / t_screen, 1),
               "speedup_vs_whole_prompt_exhaustive": round(t_exh_whole / t_screen, 1),
               "rank_corr_validated": round(float(rho_top), 3), "rank_corr_all_active": round(float(rho_all), 3),
               "one_vs_many_per_pass_max_diff": float(gap), "small_edits": int(small.sum()),
               "rank_corr_small_edits": round(float(rho_small), 3), "sampled_one_per_pass": n_sampled,
               "sampled_whole_prompt": n_whole}
    _print(figures)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


def _one_per_pass(view, saes, prompts, batches, gold, tokens, prior, attr, clean, exact, a):
    """The exhaustive baseline one feature per pass, on `a.sample` random active features per layer (cached
    passes) and the first `a.whole` of them (whole prompts): seconds per ablation each way, how many were
    timed, and the largest difference from the many-per-pass `exact` effects."""
    rng = np.random.default_rng(0)
    whole = [AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(view, prompts, 16)]
    t_cached, t_whole, n_cached, n_whole, gap = 0.0, 0.0, 0, 0, 0.0
    for layer in saes:
        live = np.flatnonzero(np.abs(attr[layer]).max(0) > 0)
        for i, f in enumerate(rng.choice(live, min(a.sample, len(live)), replace=False)):
            t0 = time.perf_counter()
            effect = float((clean - ablate(view, saes, batches, gold, tokens, {layer: [int(f)]}, prior)).mean())
            t_cached += time.perf_counter() - t0
            n_cached += 1
            gap = max(gap, abs(effect - exact[layer, int(f)]))
            if i < a.whole:
                t0 = time.perf_counter()
                ablate(view, saes, whole, gold, tokens, {layer: [int(f)]}, prior)
                t_whole += time.perf_counter() - t0
                n_whole += 1
    return t_cached / n_cached, t_whole / max(n_whole, 1), n_cached, n_whole, gap


def _print(f: dict) -> None:
    t = Table(title=f"tracing '{f['emotion']}' on {f['examples']} examples, {f['layers']} layers, "
                    f"{f['active_features']} active features")
    for c in ["method", "seconds", "ratio"]:
        t.add_column(c)
    t.add_row(f"attribution screen + exact top-{f['validated_per_phase']} per phase (cached answer passes)",
              f"{f['screen_plus_validation_s']:.2f}", "1.0")
    t.add_row(f"exhaustive exact ablation, many per pass (all {f['active_features']}, measured)",
              f"{f['exhaustive_each_s']:.1f}", f"{f['speedup_vs_batched_exhaustive']:.0f}x")
    t.add_row(f"exhaustive exact ablation, cached answer passes (extrapolated from {f['sampled_one_per_pass']})",
              f"{f['exhaustive_cached_s_extrapolated']:.0f}", f"{f['speedup_vs_cached_exhaustive']:.0f}x")
    t.add_row(f"exhaustive exact ablation, whole prompts (extrapolated from {f['sampled_whole_prompt']})",
              f"{f['exhaustive_whole_s_extrapolated']:.0f}", f"{f['speedup_vs_whole_prompt_exhaustive']:.0f}x")
    Console().print(t)
    Console().print(f"Spearman(attribution, exact): validated top features {f['rank_corr_validated']:.2f}, every "
                    f"active feature {f['rank_corr_all_active']:.2f}, the {f['small_edits']} whose ablation moves the "
                    f"residual < 5% {f['rank_corr_small_edits']:.2f}")


def _screen(view, saes, prompts, gold, tokens, prior, phase_of, topk) -> dict:
    """The trace stage's screen, timed: the prompts' prefixes (run once: every method needs them), one
    attribution, and the top-k per phase ablated exactly in one ablate_each call."""
    t0 = time.perf_counter()
    batches = answer_batches(view, prompts)
    t_prefix = time.perf_counter() - t0
    attr, clean = attribution(view, saes, batches, gold, tokens, prior)
    est = {layer: -v.mean(0) for layer, v in attr.items()}
    cand = [c for p in sorted(set(phase_of.values()))
            for c in sorted(((est[layer][f], layer, int(f)) for layer in saes if phase_of[layer] == p
                             for f in np.argsort(-est[layer])[:topk]), reverse=True)[:topk]]
    exact_top = (clean - ablate_each(view, saes, batches, gold, tokens, [{la: [f]} for _, la, f in cand],
                                     prior)).mean(1)
    return {"prefix": t_prefix, "screen": time.perf_counter() - t0, "batches": batches, "attr": attr,
            "clean": clean, "est": est, "exact_top": exact_top, "est_top": [float(e) for e, _, _ in cand]}


@torch.no_grad()
def _edit_size(view, saes, batches, tokens, active) -> np.ndarray:
    """Per active (layer, feature): the mean over examples of |ablation's change to the answer residual| /
    |answer residual| at that layer."""
    res = {}
    for part in answer_resid(view, batches, sorted(saes), tokens):
        for layer, x in part.items():
            res[layer] = torch.cat([res[layer], x]) if layer in res else x
    out = []
    for layer, f in active:
        x, sae = res[layer], saes[layer]
        delta = sae.encode(x)[:, f:f + 1] * sae.W_dec[f] * sae.out_scale(x)
        out.append(float((delta.norm(dim=-1) / x.norm(dim=-1)).mean()))
    return np.array(out)


if __name__ == "__main__":
    main()
