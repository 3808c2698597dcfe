"""Why some emotions are harder (the paper's second version): one row per emotion, from result files.

`difficulty(ev, ph, tr)` takes the evaluate, phases and trace results (the `result.json` dicts; `ph` may
be None) and returns, per emotion: its calibrated recall with interval, its confusion partners (the
wrong predictions its examples get most), how concentrated its causal features are in its strongest
phase (effective number of features, greedy set size for 80%, the top single-feature effect against
the random-feature control), how many emotion-selective features it has, and the cross-effect of its
main confusion partner's causal set on its own margin (does ablating Anger's features help Disgust?).
`associations` adds the rank correlations across emotions of recall with each candidate explanation,
with their n: with six emotions only a very strong association can be told from chance, and the
p-values say so. Pure: no I/O, no model.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import permutation_test, rankdata

EXPLANATIONS = ("effective_n", "top_effect", "selective", "partner_cross_effect")
"""Per-emotion quantities whose association with recall `associations` measures (not the partner's share
of the errors: it is bounded by 1 - recall, so it correlates with recall by construction)."""


def difficulty(ev: dict, ph: dict | None, tr: dict) -> dict:
    """Per emotion (in task order) the row described in the module docstring, and the associations."""
    labels = ev["labels"]
    cal = ev["calibrated"]
    conf = np.asarray(cal["confusion"])  # rows: gold, columns: predicted
    rows = {}
    for i, lab in enumerate(labels):
        support = int(conf[i].sum())
        wrong = [(labels[j], int(conf[i, j])) for j in np.argsort(-conf[i], kind="stable") if j != i and conf[i, j]]
        partners = [{"label": p, "n": n, "share": n / max(support, 1)} for p, n in wrong[:2]]
        row = {"recall": cal["per_class"][lab]["recall"], "support": support, "partners": partners,
               "partner_share": partners[0]["share"] if partners else 0.0}
        row.update(_causal(tr, lab, partners[0]["label"] if partners else None))
        if ph is not None:
            row["selective"] = int(ph["specific_counts"].get(lab, 0) + ph["shared_counts"].get(lab, 0))
            row["specific"] = int(ph["specific_counts"].get(lab, 0))
        rows[lab] = row
    return {"emotions": rows, "associations": associations(rows)}


def _causal(tr: dict, lab: str, partner: str | None) -> dict:
    """The trace's numbers for one emotion: its strongest phase's concentration and top effect, and the
    change in its margin when its main confusion partner's causal set is ablated."""
    e = tr["emotions"].get(lab)
    out = {"traced": e is not None, "strongest_phase": None, "effective_n": None, "n_for_80": None,
           "top_effect": None, "random_control": None, "beats_random": None, "partner_cross_effect": None}
    if e is not None and str(e.get("strongest_phase")) in e["phases"]:
        p = e["phases"][str(e["strongest_phase"])]
        top = p["features"][0]["effect"] if p["features"] else None
        rnd = p["random_control"]
        out.update(strongest_phase=e["strongest_phase"], effective_n=p["effective_n"], n_for_80=p["n_for_80"],
                   top_effect=top, random_control={k: rnd[k] for k in ("mean", "lo", "hi", "n")},
                   beats_random=None if top is None else bool(top["lo"] > rnd["hi"]))
    cross = (tr.get("cross_effects_ci") or {}).get(partner or "", {}).get(lab)
    if cross is None and partner in (tr.get("cross_effects") or {}):  # results from before the intervals
        value = tr["cross_effects"][partner].get(lab)
        cross = None if value is None else {"value": value, "lo": None, "hi": None, "n": None}
    out["partner_cross_effect"] = cross
    return out


def associations(rows: dict) -> dict:
    """Spearman correlation across emotions of recall with each explanation, with its two-sided permutation
    p-value (exact up to 8 emotions) and n;
    None where fewer than 4 emotions have both numbers or one of them does not vary."""
    out = {}
    for key in EXPLANATIONS:
        pairs = [(r["recall"]["value"], _number(r.get(key))) for r in rows.values()]
        pairs = [(a, b) for a, b in pairs if b is not None]
        x, y = np.array(pairs, float).T if pairs else (np.array([]), np.array([]))
        if len(pairs) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out[key] = None
            continue
        out[key] = _spearman_test(x, y)
    return out


def _spearman_test(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman's rho and its two-sided permutation p-value: x's ranks permuted against y's, exactly
    (all n! orders) up to 8 emotions, else 10,000 random orders (seed 0)."""
    rx, ry = rankdata(x), rankdata(y)
    ry = (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())

    def rho(a, axis=-1):
        a = a - a.mean(axis, keepdims=True)
        return (a * ry).sum(axis) / np.linalg.norm(a, axis=axis)

    res = permutation_test((rx,), rho, permutation_type="pairings", vectorized=True, n_resamples=40_320, rng=0)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(x)}


def _number(v) -> float | None:
    return v["value"] if isinstance(v, dict) else None if v is None else float(v)
