"""Benchmark: the canary against the full audit on every candidate of a run's audit (does its verdict agree?), and
how long a check takes on the file a team ships, in llama.cpp, model load included.

Writes the canary into RUN_DIR/canary, rebuilds each audited candidate as the audit does, checks it with the canary
and compares the verdicts; then times `es.canary.check` end to end (load the GGUF in llama.cpp, check) on the
reference's own GGUF file as shipped (or --gguf). Target: a check under 10 s for Gemma-3-270M.
Usage: python bench/canary.py RUN_DIR [--n 24] [--gguf FILE] [--threads 2] [--holdout] [--candidates A,B]
       [--json out.json]

With --holdout the agreement is measured out of sample: the audited examples are split in two halves (seeded, within
each emotion); the canary is written from an audit of the first half and its verdicts are compared with an audit of
the second, so no example the canary holds or predicts from is one the verdict it is compared with was judged on.
Both halves are audited with the run's audit config (twice the audit's forwards at half the examples each).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.table import Table

from emoscope import canary as cn
from emoscope.models import ModelConfig, gguf_source, load_model
from emoscope.pipeline import RunContext
from emoscope.stages.audit import AuditConfig, Candidate, audit
from emoscope.stages.evaluate import EvalResult


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def halves(ev: EvalResult, seed: int = 0) -> tuple[EvalResult, EvalResult]:
    """The evaluated examples split in two, half of each emotion in each (seeded), as two evaluation results."""
    preds = ev.predictions
    rng = np.random.default_rng(seed)
    first = np.zeros(len(preds), bool)
    for gold in sorted(set(preds.gold)):
        idx = rng.permutation(np.flatnonzero((preds.gold == gold).to_numpy()))
        first[idx[:len(idx) // 2]] = True
    return tuple(EvalResult({**ev.data, "n": int(m.sum())}, {"predictions": preds[m].reset_index(drop=True)})
                 for m in (first, ~first))


def holdout(ctx: RunContext, n: int, names: list[str] | None = None) -> tuple[cn.Canary, dict]:
    """A canary written from an audit of one half of the examples, and the audit of the other half (the run's
    candidates, or those named; no KLD pass, which no verdict reads)."""
    acfg = AuditConfig.model_validate(ctx.result("audit")["config"])
    acfg = acfg.model_copy(update={"kld": None, "candidates": [c for c in acfg.candidates
                                                                if names is None or c.name in names]})
    a, b = halves(ctx.result("evaluate"), acfg.seed)
    phases, trace = ctx.optional("phases"), ctx.optional("trace")
    written_on = audit(ctx.task, ctx.saes, a, phases, trace, acfg)
    canary = cn.write(ctx.task, ctx.saes, a, written_on, phases, trace, {"n": n})
    return canary, audit(ctx.task, ctx.saes, b, phases, trace, acfg).data


def agreement(ctx: RunContext, canary: cn.Canary, audit: dict | None = None, names=None) -> list[dict]:
    """Per audited candidate: the audit's verdict and flips (the run's, or `audit`) beside the canary's."""
    audit = audit or ctx.result("audit")
    acfg = AuditConfig.model_validate(audit["config"])
    rows = []
    for row in audit["candidates"]:
        if names is not None and row["name"] not in names:
            continue
        cand = Candidate(name=row["name"], **row["changed"])
        r = cn.check_candidate(canary, ctx.task, cand, acfg)
        rows.append({"candidate": row["name"], "audit_failed": row["failed"], "audit_flip_rate": row["flip_rate"],
                     "canary_failed": not r.passed, "canary_drifted": "+".join(r.drifted),
                     "canary_uncertain": "+".join(r.uncertain), "predicted_flip_rate": r.predicted_flip_rate,
                     "flip_rate_lo": r.flip_rate_interval[0], "flip_rate_hi": r.flip_rate_interval[1],
                     "canary_flips": r.canary_flips,
                     "seconds": r.seconds})
    return rows


def served_check(name: str, canary: cn.Canary, threads: int) -> tuple[float, float, bool]:
    """(load seconds, check seconds, passed) of `es.canary.check` on a GGUF file (or a registry model's) in
    llama.cpp."""
    t0 = time.perf_counter()
    view = load_model(ModelConfig(name=name, backend="llama.cpp", threads=threads))
    t1 = time.perf_counter()
    r = cn.check(view, canary)
    return t1 - t0, time.perf_counter() - t1, r.passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with an audit (emoscope audit --config ...)")
    ap.add_argument("--n", type=int, default=48, help="canary examples")
    ap.add_argument("--gguf", type=Path, default=None, help="the served file (default: the reference's own GGUF)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--holdout", action="store_true", help="out of sample: the canary from one half of the examples, "
                                                              "the audit it is compared with on the other")
    ap.add_argument("--candidates", default=None, help="comma-separated audit candidates to compare (default: all)")
    ap.add_argument("--json", default=None, help="write the figures here as a flat JSON object")
    a = ap.parse_args()
    ctx = RunContext.from_run_dir(a.run_dir)
    names = a.candidates.split(",") if a.candidates else None
    t0 = time.perf_counter()
    if a.holdout:
        canary, judged = holdout(ctx, a.n, names)
    else:
        canary, judged = cn.write(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.result("audit"),
                                  ctx.optional("phases"), ctx.optional("trace"), {"n": a.n}), None
    write_s = time.perf_counter() - t0
    canary.save(a.run_dir / ("canary-holdout" if a.holdout else "canary"))
    rows = agreement(ctx, canary, judged, names)
    name = ctx.model_config.name
    source = str(a.gguf) if a.gguf else (name if gguf_source(name) is not None else None)
    served = served_check(source, canary, a.threads) if source is not None else None
    agree = sum(r["audit_failed"] == r["canary_failed"] for r in rows)
    fig = {"model": ctx.model.name, "cpu": _cpu(), "threads": a.threads, "n_canary": len(canary.meta["texts"]),
           "n_audited": canary.meta["n_audited"], "holdout": a.holdout,
           "n_judged": (judged or ctx.result("audit").data)["n"], "n_candidates": len(rows), "agreement": agree,
           "agreement_share": round(agree / len(rows), 3), "false_alarms": sum(r["canary_failed"] and not
                                                                              r["audit_failed"] for r in rows),
           "missed": sum(r["audit_failed"] and not r["canary_failed"] for r in rows),
           "uncertain": sum(bool(r["canary_uncertain"]) for r in rows),
           "uncertain_audit_failed": sum(bool(r["canary_uncertain"]) and r["audit_failed"] for r in rows),
           "write_s": round(write_s, 2),
           "max_check_scoring_s": round(max(r["seconds"] for r in rows), 3),
           "served_file": str(source) if source else None,
           "served_load_s": round(served[0], 2) if served else None,
           "served_check_s": round(served[1], 2) if served else None,
           "served_total_s": round(served[0] + served[1], 2) if served else None,
           "served_passed": served[2] if served else None}
    table = Table(title=f"canary ({fig['n_canary']} examples) against the full audit ({fig['n_audited']}), "
                        f"{fig['model']} ({fig['cpu']})")
    for col in ("candidate", "audit flips", "audit", "canary predicted flips (interval)", "canary flips", "canary",
                "agree"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["candidate"], f"{r['audit_flip_rate']:.3f}", "FAIL" if r["audit_failed"] else "pass",
                      f"{r['predicted_flip_rate']:.3f} ({r['flip_rate_lo']:.3f}-{r['flip_rate_hi']:.3f})",
                      f"{r['canary_flips']}/{fig['n_canary']}",
                      r["canary_drifted"] or ("uncertain" if r["canary_uncertain"] else "pass"),
                      "yes" if r["audit_failed"] == r["canary_failed"] else "NO")
    Console().print(table)
    if served:
        print(f"es.canary.check on {source} in llama.cpp: load {served[0]:.2f} s + check {served[1]:.2f} s")
    print(json.dumps(fig))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)
        with open(Path(a.json).with_suffix(".rows.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
