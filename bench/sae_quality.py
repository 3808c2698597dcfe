"""SAE-quality evaluation: recomputing every spliced pass from the first layer, against replaying the clean
pass's blocks before the hook, and against CE losses on a sample of next-token positions.

Side by side in one run, on a run directory's SAEs and its saes stage's held-out batches:
- `recompute`: each spliced and zero-ablated pass runs the whole model (the method before issue #29);
- `replay`: the blocks before the hook return the clean pass's outputs (the default; must equal `recompute`
  bit for bit);
- `sample N`: replay, with the CE losses at N sampled next-token positions per batch, over several seeds:
  the change in CE-loss recovered against every position, and its spread across seeds.

Usage: python bench/sae_quality.py RUN_DIR [--positions 256] [--seeds 5] [--layers 0,8,17] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from emoscope.models import load_model
from emoscope.sae.quality import evaluate_saes, heldout_batches
from emoscope.stages.saes import SAEsResult


def timed(view, saes, batches, **kw) -> tuple[float, dict]:
    t = time.perf_counter()
    q = evaluate_saes(view, saes, batches, **kw)
    return time.perf_counter() - t, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--positions", type=int, default=256, help="sampled next-token positions per batch")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the position sample")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: every SAE of the run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    run = Path(a.run_dir)
    res = json.loads((run / "saes" / "result.json").read_text())
    cfg = res["config"]
    view = load_model(res["model"], device="cpu", dtype="float32")
    saes = SAEsResult.load(run / "saes", view).saes
    if a.layers:
        keep = {f"blocks.{i}.hook_resid_post" for i in a.layers.split(",")}
        saes = {n: s for n, s in saes.items() if n in keep}
    batches = heldout_batches(view, cfg["eval_seqs"], cfg["eval_context"], cfg["train"]["seed"])
    stored = {n: res["quality"][n].get("ce_recovered") for n in saes}  # none where the run skipped CE
    t_rec, q_rec = timed(view, saes, batches, reuse=False)
    t_rep, q_rep = timed(view, saes, batches)
    same = all(q_rec[n] == q_rep[n] for n in saes)
    sampled = [timed(view, saes, batches, ce_positions=a.positions, seed=s) for s in range(a.seeds)]
    full = {n: q_rep[n]["ce_recovered"] for n in saes}
    diffs = [[q[n]["ce_recovered"] - full[n] for n in saes] for _, q in sampled]
    per_seed_mean = [statistics.fmean(d) for d in diffs]
    max_abs = max(abs(x) for d in diffs for x in d)
    spread = statistics.fmean(statistics.pstdev([q[n]["ce_recovered"] for _, q in sampled]) for n in saes)
    t_smp = statistics.fmean(t for t, _ in sampled)
    n_pos = sum(int(m[:, 2:].sum()) for _, m in batches)
    t = Table(title=f"SAE quality, {view.name}, {len(saes)} SAEs, {len(batches)} batches, {n_pos} next-token "
                    f"positions ({os.cpu_count()} cores)")
    for c in ["method", "seconds", "speed-up", "CE recovered vs every position"]:
        t.add_column(c)
    t.add_row("recompute (before)", f"{t_rec:.1f}", "1.00", "-")
    t.add_row("replay (default)", f"{t_rep:.1f}", f"{t_rec / t_rep:.2f}", "identical" if same else "DIFFERENT")
    t.add_row(f"replay + sample {a.positions} ({a.seeds} seeds)", f"{t_smp:.1f}", f"{t_rec / t_smp:.2f}",
              f"max |diff| {max_abs:.4f}, mean diff {statistics.fmean(per_seed_mean):+.4f}, "
              f"sd across seeds {spread:.4f}")
    Console(width=160).print(t)
    print(f"stored result.json equals the replayed values: {all(stored[n] == full[n] for n in saes)}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "model": view.name, "saes": len(saes), "positions_total": n_pos, "positions_sampled": a.positions,
            "seeds": a.seeds, "recompute_s": round(t_rec, 2), "replay_s": round(t_rep, 2),
            "sample_s": round(t_smp, 2), "replay_speedup": round(t_rec / t_rep, 3),
            "sample_speedup": round(t_rec / t_smp, 3), "replay_identical": same,
            "stored_identical": all(stored[n] == full[n] for n in saes), "sample_max_abs_diff": round(max_abs, 5),
            "sample_mean_diff": round(statistics.fmean(per_seed_mean), 5), "sample_sd": round(spread, 5),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
