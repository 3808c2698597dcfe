"""Benchmark: attribution screen + exact validation of the top-k per phase (as the trace stage does)
vs exhaustive single-feature exact ablation, same examples and layers. Exhaustive ablation of every
active feature is too slow on a CPU, so a random sample of active features is ablated and its time
extrapolated (labelled as such). Features inactive on every traced example have exactly zero effect
under zero-ablation and are not counted. The exhaustive baseline is timed two ways: with the same
cached answer passes the stage uses (each prompt's tokens before the answer run once), and with
whole-prompt passes, as a straightforward implementation runs them. Both the screen and the cached
exhaustive baseline pay the one-time prefix passes (each prompt's tokens before its answer), timed once
and counted on both sides. The screen validates as many candidates per phase as the run's trace config.
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
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from emoscope.interventions.answers import AnswerBatch, answer_batches, first_token_prior, prompt_batches
from emoscope.interventions.effects import ablate, attribution
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

    t0 = time.perf_counter()  # the prompts' prefixes, run once: both methods need them
    batches = answer_batches(view, prompts)
    t_prefix = time.perf_counter() - t0
    t0 = time.perf_counter()  # the stage's screen: one attribution, top-k per phase ablated
    attr, clean = attribution(view, saes, batches, gold, tokens, prior)
    est = {layer: -v.mean(0) for layer, v in attr.items()}
    exact_top, est_top = [], []
    for p in sorted(set(phase_of.values())):
        cand = sorted(((est[layer][f], layer, int(f)) for layer in saes if phase_of[layer] == p
                       for f in np.argsort(-est[layer])[:a.topk]),
                      reverse=True)[:a.topk]
        for e, layer, f in cand:
            exact_top.append(float((clean - ablate(view, saes, batches, gold, tokens, {layer: [f]}, prior)).mean()))
            est_top.append(float(e))
    t_screen = time.perf_counter() - t0 + t_prefix

    rng = np.random.default_rng(0)
    whole = [AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(view, prompts, 16)]
    n_active, ex_s, est_s, t_cached, t_whole, n_whole = 0, [], [], 0.0, 0.0, 0
    for layer in saes:
        active = np.flatnonzero(np.abs(attr[layer]).max(0) > 0)
        n_active += len(active)
        for i, f in enumerate(rng.choice(active, min(a.sample, len(active)), replace=False)):
            t0 = time.perf_counter()
            ex_s.append(float((clean - ablate(view, saes, batches, gold, tokens, {layer: [int(f)]}, prior)).mean()))
            t_cached += time.perf_counter() - t0
            est_s.append(float(est[layer][f]))
            if i < a.whole:
                t0 = time.perf_counter()
                ablate(view, saes, whole, gold, tokens, {layer: [int(f)]}, prior)
                t_whole += time.perf_counter() - t0
                n_whole += 1
    t_exh_cached = t_prefix + t_cached / len(ex_s) * n_active
    t_exh_whole = t_whole / max(n_whole, 1) * n_active
    rho_top = spearmanr(est_top, exact_top).statistic
    rho_sample = spearmanr(est_s, ex_s).statistic
    figures = {"emotion": lab, "examples": len(prompts), "layers": len(saes), "phases": len(set(phase_of.values())),
               "active_features": n_active, "validated_per_phase": a.topk, "prefix_s": round(t_prefix, 2),
               "screen_plus_validation_s": round(t_screen, 2),
               "exhaustive_cached_s_extrapolated": round(t_exh_cached,
                                                         1), "exhaustive_whole_s_extrapolated": round(t_exh_whole, 1),
               "speedup_vs_cached_exhaustive": round(t_exh_cached / t_screen, 1),
               "speedup_vs_whole_prompt_exhaustive": round(t_exh_whole / t_screen, 1),
               "rank_corr_validated": round(float(rho_top), 3), "rank_corr_random_sample": round(float(rho_sample), 3)}
    t = Table(title=f"tracing '{lab}' on {len(prompts)} examples, {len(saes)} layers, {n_active} active features")
    for c in ["method", "seconds", "ratio"]:
        t.add_column(c)
    t.add_row(f"attribution screen + exact top-{a.topk} per phase (cached answer passes)", f"{t_screen:.1f}", "1.0")
    t.add_row(f"exhaustive exact ablation, cached answer passes (extrapolated from {len(ex_s)})", f"{t_exh_cached:.0f}",
              f"{figures['speedup_vs_cached_exhaustive']:.0f}x")
    t.add_row(f"exhaustive exact ablation, whole prompts (extrapolated from {n_whole})", f"{t_exh_whole:.0f}",
              f"{figures['speedup_vs_whole_prompt_exhaustive']:.0f}x")
    Console().print(t)
    Console().print(f"Spearman(attribution, exact): validated top features {rho_top:.2f}, random active features "
                    f"{rho_sample:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
