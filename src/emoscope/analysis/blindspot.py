"""What the standard quality figure misses: the audit's verdict beside llama-perplexity's KL divergence, per candidate.

A deployer who picks a build under a KLD bar (or a same-top-p bar) treats every build under it as fine. From an
audit whose rows carry `kld` (audit.kld set), `blind_spots(rows)` lists the builds such a bar passes that the emotion
audit fails (**missed**) and those it rejects that the audit passes (**false alarms**), and gives the rank correlation
between mean KLD and the emotion flip rate across the builds, with a bootstrap interval over builds. The default bar is
the audit's own Q4_K_M build in the same runtime ("as close to the reference as Q4_K_M"), the level most quantizers
ship; a number sets another. Pure statistics on result rows: no model, no I/O.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

REFERENCE_TYPE = "Q4_K_M"


def _runtime(row: dict) -> str:
    return "llama.cpp" if row.get("runtime") else "transformers"


def _q4km_bar(rows: list[dict], key: str) -> dict[str, float]:
    """Per runtime, the figure of the audit's Q4_K_M row: a Q4_K_M file quantized from the reference's weights (emulated
    or run) first, else a shipped Q4_K_M file (`model: source`), which measures less when the reference was dequantised
    from that very file (the llama.cpp arithmetic alone); a row indistinguishable from the reference (mean KLD within
    its error) is no bar, since every other build would then be over it."""
    out = {}
    made = [r for r in rows if REFERENCE_TYPE in str(r.get("changed", {}).get("precision", ""))]
    shipped = [r for r in rows if r not in made and r.get("file_type") == REFERENCE_TYPE]
    for r in made + shipped:
        if r["kld"]["mean_kld"] > r["kld"]["mean_kld_err"]:
            out.setdefault(_runtime(r), r["kld"][key])
    return out


def blind_spots(rows: list[dict], kld_bar: float | None = None, same_top_bar: float | None = None,
                n_boot: int = 2000, seed: int = 0) -> dict | None:
    """The builds a KLD bar (`kld_bar`, else each runtime's Q4_K_M row) or a same-top-p bar (`same_top_bar`, else
    Q4_K_M's) passes while the audit fails them, and the reverse; Spearman's rho between mean KLD and flip rate with a
    percentile bootstrap interval over builds (None with fewer than three builds). None when no row has figures."""
    measured = [r for r in rows if r.get("kld")]
    if not measured:
        return None
    bars = {"kld": _q4km_bar(measured, "mean_kld"), "same_top": _q4km_bar(measured, "same_top_p")}
    out = {"n": len(measured), "bars": {}, "builds": []}
    for r in measured:
        rt = _runtime(r)
        kb = kld_bar if kld_bar is not None else bars["kld"].get(rt)
        sb = same_top_bar if same_top_bar is not None else bars["same_top"].get(rt)
        out["bars"][rt] = {"mean_kld": kb, "same_top_p": sb}
        fine_kld = None if kb is None else bool(r["kld"]["mean_kld"] <= kb)
        fine_top = None if sb is None else bool(r["kld"]["same_top_p"] >= sb)
        out["builds"].append({"name": r["name"], "runtime": rt, "mean_kld": r["kld"]["mean_kld"],
                              "mean_kld_err": r["kld"]["mean_kld_err"], "same_top_p": r["kld"]["same_top_p"],
                              "flip_rate": r["flip_rate"], "audit_failed": bool(r["failed"]),
                              "fine_by_kld": fine_kld, "fine_by_same_top": fine_top})
    b = out["builds"]
    out["missed_by_kld"] = [x["name"] for x in b if x["fine_by_kld"] and x["audit_failed"]]
    out["false_alarms_by_kld"] = [x["name"] for x in b if x["fine_by_kld"] is False and not x["audit_failed"]]
    out["missed_by_same_top"] = [x["name"] for x in b if x["fine_by_same_top"] and x["audit_failed"]]
    out["false_alarms_by_same_top"] = [x["name"] for x in b if x["fine_by_same_top"] is False and not x["audit_failed"]]
    out["spearman_kld_flips"] = _spearman([x["mean_kld"] for x in b], [x["flip_rate"] for x in b], n_boot, seed)
    return out


def _spearman(x: list[float], y: list[float], n_boot: int, seed: int) -> dict | None:
    """Spearman's rho and its 95% percentile bootstrap interval over builds (resamples with no spread skipped)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(spearmanr(x, y).statistic)
    rng, draws = np.random.default_rng(seed), []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(spearmanr(x[i], y[i]).statistic)
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"value": rho, "lo": float(lo), "hi": float(hi), "n": int(len(x))}
