"""The paper's claims as verdicts on one run's results: the rules, written once.

`claims(results)` takes a run's stage results (stage name -> the `result.json` dict; missing stages
give no rows) and returns one `Verdict` per claim and sub-claim: `reproduced`, `not reproduced` or
`inconclusive`, with the number it rests on, its 95% interval and n. Pure: no I/O, no model.

The rules (an interval is the stage's 95% bootstrap interval):
- 1a three phases: the change-point fit's number of phases is 3 (its own min-gain criterion decides).
- 1b emotion features emerge in the last phase: share of emotion-selective features in the last phase;
  reproduced when its interval lies above 0.5, not when below, inconclusive when it straddles 0.5 or
  no feature is selective.
- 2 shared and specific features: selective features shared by several emotions and specific to one
  both exist (not reproduced when one kind is absent; inconclusive when none is selective).
- 3a few high-impact features per emotion: per emotion, in its strongest phase, the greedy set that
  removes 80% of the margin has at most 5 features and the top feature's effect interval lies above the
  random-feature control's range; reproduced when that holds for all emotions but at most one, not when
  for fewer than half, else inconclusive.
- 3b Disgust weakest: disgust's top single-feature effect is the smallest; reproduced when its interval
  lies below every other emotion's, inconclusive when only its point estimate is smallest.
- 3c Disgust overshadowed by Anger (v2): disgust's most frequent wrong calibrated prediction is anger, and
  ablating anger's causal set raises disgust's margin; reproduced when both hold, not when neither,
  else inconclusive. 3d Surprise and Fear concentrated (v2): in their strongest phase they have the two
  smallest effective numbers of features; inconclusive when only one of them does.
- 4a steering improves recognition: feature steering's test macro-F1 against the best baseline
  (contextual, dev-fitted, few-shot, probe steering); reproduced when its interval lies above the
  baseline's, not when its point estimate is not above, else inconclusive. 4b the same per transfer
  dataset against contextual calibration there. 4c keeps language modelling: perplexity changes by
  less than 5%.
- 5a silent degradation under prompt changes: a prompt or text candidate flips more than 10% of
  predictions while accuracy moves less than 5 points; value: the share of such candidates.
- 5b the last phase is the fragile one: share of candidates whose final phase's excess drift interval
  lies above 0; reproduced above one half, not reproduced when more candidates lie below 0 than above.
- 5c quantization breaks emotion inference: a precision or quantized-KV-cache candidate fails the audit's
  thresholds.
"""

from __future__ import annotations

from typing import NamedTuple

REPRODUCED, NOT, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
BASELINES = ("contextual_calibration", "dev_fitted_calibration", "few_shot_dev_demos", "probe_steering")
FEW, MAX_PPL_CHANGE, FLIPS, ACC_MOVE = 5, 0.05, 0.10, 0.05


class Verdict(NamedTuple):
    claim: str
    """Claim id and short name, e.g. '1a three phases'."""
    verdict: str
    """reproduced, not reproduced or inconclusive."""
    value: float | None
    """The number the verdict rests on."""
    lo: float | None
    """Its 95% interval, where there is one."""
    hi: float | None
    n: int | None
    """Examples (or candidates, features) behind the number."""
    basis: str
    """What the number is, in words."""


def _interval(lo: float, hi: float, ref: float) -> str:
    """Above `ref` (interval entirely above), below it, or not separated from it."""
    return REPRODUCED if lo > ref else NOT if hi < ref else INCONCLUSIVE


def phases_claims(ph: dict) -> list[Verdict]:
    k, share = ph["n_phases"], ph["last_phase_share"]
    shared, specific = sum(ph["shared_counts"].values()), sum(ph["specific_counts"].values())
    depth = ph["boundaries"][-1]["depth"] if ph["boundaries"] else None
    out = [Verdict("1a three phases", REPRODUCED if k == 3 else NOT, k, None, None, ph.get("n"),
                   f"phases fitted ({k}); last boundary at depth {depth:.2f}" if depth is not None
                   else f"phases fitted ({k})")]
    total = shared + specific
    out.append(Verdict("1b emotion features in the last phase",
                       _interval(share["lo"], share["hi"], 0.5) if total else INCONCLUSIVE,
                       share["value"], share["lo"], share["hi"], total,
                       "share of selective features in the last phase"))
    out.append(Verdict("2 shared and specific features",
                       INCONCLUSIVE if not total else REPRODUCED if shared and specific else NOT,
                       float(shared), None, None, total, f"{shared} shared, {specific} specific selective features"))
    return out


def trace_claims(tr: dict) -> list[Verdict]:
    tops, few = {}, 0
    for lab, e in tr["emotions"].items():
        ph = e["phases"].get(str(e.get("strongest_phase")))
        if not ph or not ph["features"]:
            continue
        eff, rnd = ph["features"][0]["effect"], ph["random_control"]
        tops[lab] = eff
        few += int(ph["n_for_80"] is not None and ph["n_for_80"] <= FEW and eff["lo"] > rnd["hi"])
    out = []
    if tops:
        verdict = REPRODUCED if few >= len(tops) - 1 else NOT if few < len(tops) / 2 else INCONCLUSIVE
        out.append(Verdict("3a few high-impact features per emotion", verdict, few / len(tops), None, None,
                           len(tops), f"emotions whose margin {FEW} features remove 80% of, beyond random"))
    if "disgust" in tops and len(tops) > 1:
        d, others = tops["disgust"], {k: v for k, v in tops.items() if k != "disgust"}
        weakest = d["value"] < min(v["value"] for v in others.values())
        separate = d["hi"] < min(v["lo"] for v in others.values())
        out.append(Verdict("3b Disgust weakest", REPRODUCED if separate else INCONCLUSIVE if weakest else NOT,
                           d["value"], d["lo"], d["hi"], d.get("n"), "disgust's top single-feature effect (nats)"))
    return out


def harder_claims(ev: dict, tr: dict) -> list[Verdict]:
    """The second version's questions: why Disgust is hard, whether Surprise and Fear are concentrated."""
    labels, out = ev.get("labels") or [], []
    conf = (ev.get("calibrated") or {}).get("confusion")  # rows: gold, columns: predicted
    if conf and {"disgust", "anger"} <= set(labels):
        d = labels.index("disgust")
        wrong = {lab: n for j, (lab, n) in enumerate(zip(labels, conf[d])) if j != d}
        confused = max(wrong, key=wrong.get) == "anger" and wrong["anger"] > 0
        helped = (tr.get("cross_effects", {}).get("anger") or {}).get("disgust")
        both = [confused, helped is not None and helped > 0]
        out.append(Verdict("3c Disgust overshadowed by Anger",
                           REPRODUCED if all(both) else NOT if not any(both) else INCONCLUSIVE,
                           wrong["anger"] / max(sum(conf[d]), 1), None, None, sum(conf[d]),
                           "share of disgust predicted as anger; ablating anger's set changes disgust's margin by "
                           + ("n/a" if helped is None else f"{helped:+.2f}")))
    eff = {lab: e["phases"][str(e["strongest_phase"])]["effective_n"] for lab, e in tr["emotions"].items()
           if str(e.get("strongest_phase")) in e["phases"]}
    if {"surprise", "fear"} <= set(eff) and len(eff) > 2:
        two = set(sorted(eff, key=eff.get)[:2])
        hits = len(two & {"surprise", "fear"})
        out.append(Verdict("3d Surprise and Fear concentrated", REPRODUCED if hits == 2 else INCONCLUSIVE if hits
                           else NOT, (eff["surprise"] + eff["fear"]) / 2, None, None, len(eff),
                           "their mean effective number of features (the two smallest of all emotions?)"))
    return out


def steer_claims(st: dict) -> list[Verdict]:
    m = st["methods"]
    fs = m["feature_steering"]["test"]["macro_f1"]
    base = max((m[b]["test"]["macro_f1"] for b in BASELINES if m.get(b) and m[b].get("test")),
               key=lambda e: e["value"])
    gain = fs["value"] - base["value"]
    out = [Verdict("4a steering improves recognition",
                   REPRODUCED if fs["lo"] > base["hi"] else NOT if gain <= 0 else INCONCLUSIVE,
                   gain, fs["lo"] - base["hi"], fs["hi"] - base["lo"], st.get("n_test"),
                   "test macro-F1 gain over the best baseline (interval: the two intervals' extremes)")]
    for ds, e in m["feature_steering"].items():
        ref = (m.get("contextual_calibration") or {}).get(ds)
        if ds == "test" or not e or not ref:
            continue
        a, b = e["macro_f1"], ref["macro_f1"]
        out.append(Verdict(f"4b transfer to {ds}",
                           REPRODUCED if a["lo"] > b["hi"] else NOT if a["value"] <= b["value"] else INCONCLUSIVE,
                           a["value"] - b["value"], a["lo"] - b["hi"], a["hi"] - b["lo"], None,
                           "macro-F1 gain over contextual calibration"))
    ppl = st["side_effects"]["ppl_change"]
    out.append(Verdict("4c keeps language modelling", REPRODUCED if abs(ppl) < MAX_PPL_CHANGE else NOT, ppl,
                       None, None, st["side_effects"].get("tokens"), "relative perplexity change on WikiText-2"))
    return out


def audit_claims(au: dict) -> list[Verdict]:
    cands = au["candidates"]
    # what a candidate changed, from `changed` (library-kernel rows carry no top-level `precision`)
    deployed = lambda c: bool((c.get("changed") or {}).keys() & {"precision", "kv_cache"})  # noqa: E731
    prompt = [c for c in cands if not deployed(c) and not (c.get("changed") or {}).get("model")]
    precision = [c for c in cands if deployed(c)]
    out = []
    if prompt:
        silent = [c for c in prompt if c["flip_rate"] > FLIPS and abs(c["accuracy_change"]["value"]) < ACC_MOVE]
        out.append(Verdict("5a silent degradation under prompt changes", REPRODUCED if silent else NOT,
                           len(silent) / len(prompt), None, None, len(prompt),
                           f"prompt/text changes flipping > {FLIPS:.0%} with accuracy within {ACC_MOVE:.0%}"))
    excess = [c["final_phase_excess"] for c in cands if c.get("final_phase_excess")]
    if excess:
        above, below = sum(e["lo"] > 0 for e in excess), sum(e["hi"] < 0 for e in excess)
        out.append(Verdict("5b last phase most fragile",
                           REPRODUCED if above > len(excess) / 2 else NOT if below > above else INCONCLUSIVE,
                           above / len(excess), None, None, len(excess),
                           "share of candidates whose final phase drifts more (interval above 0)"))
    if precision:
        failed = [c["name"] for c in precision if c["failed"]]
        out.append(Verdict("5c quantization breaks it", REPRODUCED if failed else NOT, len(failed) / len(precision),
                           None, None, len(precision), "precision and KV-cache candidates failing the thresholds: "
                           + (", ".join(failed) or "none")))
    return out


def claims(results: dict[str, dict]) -> list[Verdict]:
    """Every claim the given stage results speak to, in claim order."""
    rules = {"phases": phases_claims, "trace": trace_claims, "steer": steer_claims, "audit": audit_claims}
    out = [v for stage, rule in rules.items() if stage in results for v in rule(results[stage])]
    if "evaluate" in results and "trace" in results:
        at = next((i for i, v in enumerate(out) if v.claim.startswith("4")), len(out))
        out[at:at] = harder_claims(results["evaluate"], results["trace"])
    return out
