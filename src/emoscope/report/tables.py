"""Markdown tables of a run's headline numbers, per stage (`emoscope summarize RUN --stage STAGE`).

Read straight from the stages' result.json files, so the README's tables are regenerated, not typed.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import read_json
from ..errors import EmoscopeError


def ci(m: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(m['value'])} [{fmt.format(m['lo'])}, {fmt.format(m['hi'])}]"


def _load(run_dir: Path, stage: str) -> dict:
    f = Path(run_dir) / stage / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no {stage}/result.json")
    return read_json(f)


def phases(run_dir: Path) -> str:
    r = _load(run_dir, "phases")
    b = ", ".join(f"layer {x['layer']} [{x['lo']:.0f}, {x['hi']:.0f}]" for x in r["boundaries"]) or "none"
    share = r["last_phase_share"]
    out = [f"{r['model']}: n = {r['n']} ({r['n_correct']} correct), {r['n_phases']} phase(s) "
           f"({' -> '.join(r['phase_names'])}), boundaries {b}; share of emotion-selective features in the last "
           f"phase {ci(share, '{:.2f}')} ({share['n_boot']} subsamples)", "",
           "| emotion | specific | shared | by phase (specific/shared) |", "|---|---|---|---|"]
    for lab in r["labels"]:
        per = r["per_phase_counts"].get(lab, {})
        by = "; ".join(f"phase {p}: {v['specific']}/{v['shared']}" for p, v in sorted(per.items())) or "-"
        out.append(f"| {lab} | {r['specific_counts'][lab]} | {r['shared_counts'][lab]} | {by} |")
    out += ["",
            "| layer | selective | surface | semantic | probe resid (shuffled) | probe codes (shuffled) | "
            "logit-lens P(gold) |",
            "|---|---|---|---|---|---|---|"]
    for row in r["layers"]["all"]:
        pr = lambda k: row[k]["mean"] if isinstance(row[k], dict) else row[k]
        out.append(f"| {row['layer']} | {row['n_selective']} | {row['surface']:.2f} | {row['semantic']:.3f} | "
                   f"{pr('probe_resid'):.2f} ({pr('probe_resid_shuffled'):.2f}) | "
                   f"{pr('probe_codes'):.2f} ({pr('probe_codes_shuffled'):.2f}) | "
                   f"{row['lens_gold_prob']:.3f} |")
    return "\n".join(out)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def trace(run_dir: Path) -> str:
    r = _load(run_dir, "trace")
    names = r["phase_names"]
    out = ["| emotion | n | clean margin | phase | top feature (layer:id) | its effect | features for 50% / 80% | set "
           "effect | random control (same size) | top attribution: real / shuffled labels | effective n | "
           "strongest phase | screen check: Spearman / top recall |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab, e in r["emotions"].items():
        for p, ph in e["phases"].items():
            f = ph["features"][0] if ph["features"] else None
            rc = ph["random_control"]
            need = ("n/a (margin ≤ 0)" if e["clean_margin"]["value"] <= 0 else
                    " / ".join(f">{len(ph['features'])}" if ph[k] is None else str(ph[k])
                               for k in ("n_for_50", "n_for_80")))
            out.append(f"| {lab} | {e['n']} | {ci(e['clean_margin'], '{:.2f}')} | {names[int(p)]} | "
                       f"{'-' if f is None else str(f['layer']) + ':' + str(f['feature'])} | "
                       f"{'-' if f is None else ci(f['effect'], '{:.2f}')} | {need} | {ph['set_effect']:.2f} | "
                       f"{rc['mean']:.2f} [{rc['lo']:.2f}, {rc['hi']:.2f}] | {_num(ph.get('top_attribution'))} / "
                       f"{_num(ph.get('shuffled_label_top_attribution'))} | {ph['effective_n']:.1f} | "
                       f"{names[e['strongest_phase']]} | {screen(ph.get('screen_check'))} |")
    for lab, why in r["skipped"].items():
        out.append(f"| {lab} | skipped: {why} |")
    if r["config"].get("screen") == "exact":
        out += ["", "Candidates ranked by exact ablation of every active feature (trace.screen: exact)."]
    weak = weak_screens(r)
    if weak:
        out += ["", f"Attribution screen flagged ({', '.join(weak)}): its ranking disagrees with exact ablation or "
                "a sampled feature beats every validated one; validate more candidates (trace.candidates), rank "
                "by exact ablation (trace.screen: exact) or train better SAEs before reading the causal sets."]
    multi = {lab: t for lab, t in r.get("label_first_tokens", {}).items() if t["n_tokens"] > 1}
    if multi:
        out += ["", "Margins read the labels' first tokens; these labels have more, so their margin is a proxy: " +
                ", ".join(f"{lab} ({t['n_tokens']} tokens, first {t['first']!r})" for lab, t in multi.items())]
    return "\n".join(out)


def screen(c: dict | None) -> str:
    """The screen check of one emotion and phase: Spearman [interval] / top recall, and a flag."""
    if not c:
        return "-"
    s = c["spearman"]
    rho = "-" if s["value"] != s["value"] else f"{s['value']:.2f}"
    if s["lo"] is not None:
        rho += f" [{s['lo']:.2f}, {s['hi']:.2f}]"
    beaten = f", {len(c['beats_best'])} sampled beat the best" if c["beats_best"] else ""
    return f"{rho} / {c['top_recall']['value']:.2f} (n = {s['n']}{beaten}){' FLAGGED' if c['flagged'] else ''}"


def weak_screens(r: dict) -> list[str]:
    """emotion/phase pairs whose attribution screen the check flagged."""
    return [f"{lab} phase {int(p) + 1}" for lab, e in r["emotions"].items() for p, ph in e["phases"].items()
            if (ph.get("screen_check") or {}).get("flagged")]


def steer(run_dir: Path) -> str:
    r = _load(run_dir, "steer")
    sets = sorted({k for m in r["methods"].values() for k in m})
    head = " | ".join(f"{s} accuracy | {s} macro-F1" for s in sets)
    ch = r["chosen"]
    st = ", ".join(f"{k} ×{v:g}" for k, v in ch["strengths"].items()) if "strengths" in ch else f"×{ch['strength']:g}"
    out = [f"chosen on {r['n_dev']} dev examples ({len(r['search'])} points searched): {ch['features_per_emotion']} "
           f"feature(s) per emotion, strengths {st}; dev macro-F1 {ch['dev_macro_f1']:.3f}; test n = {r['n_test']}", "",
           f"| method | {head} |", "|---|" + "---|" * (2 * len(sets))]
    for name, m in r["methods"].items():
        cells = " | ".join(f"{ci(m[s]['accuracy'])} | {ci(m[s]['macro_f1'])}" if s in m else "- | -" for s in sets)
        out.append(f"| {name} | {cells} |")
    se = r["side_effects"]
    out += ["",
            f"WikiText-2 perplexity {se['ppl_clean']:.2f} -> {se['ppl_steered_all_positions']:.2f} with the "
            f"steering at every position ({100 * se['ppl_change']:+.1f}%), next-token KL "
            f"{se['kl_all_positions']:.3f} nats, {se['tokens']} tokens"]
    return "\n".join(out)


def audit(run_dir: Path) -> str:
    r = _load(run_dir, "audit")
    out = [f"reference calibrated accuracy {r['reference_accuracy']:.3f}, n = {r['n']}; failed thresholds: "
           f"{', '.join(r['failed']) or 'none'}", "",
           "| candidate | accuracy change | flip rate | drift by phase: 1 - top-k Jaccard (÷ unrelated-input drift) | "
           "final phase's normalised excess over earlier ones | causal survival / ablation effect retained | "
           "AUROC flips: confidence drop / causal drift | worst emotion (recall change) |",
           "|---|---|---|---|---|---|---|---|"]
    for c in r["candidates"]:
        fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"
        d = " / ".join(fmt(v) for _, v in sorted(c["drift_by_phase"].items()))
        if "drift_by_phase_raw" in c:  # older results hold the raw drift under drift_by_phase
            d = " / ".join(fmt(v) for _, v in sorted(c["drift_by_phase_raw"].items())) + f" ({d})"
        au = c["detection_auroc"]
        worst = min(c["recall_change"], key=c["recall_change"].get)
        out.append(f"| {c['name']} | {ci(c['accuracy_change'], '{:+.3f}')} | {c['flip_rate']:.2f} | {d} | "
                   f"{final_excess(c)} | {fmt(c['causal_survival'])} / {retained(c)} | "
                   f"{fmt(au.get('confidence_drop'))} / {fmt(au.get('causal_feature_drift'))} | "
                   f"{worst} ({c['recall_change'][worst]:+.2f}) |")
    return "\n".join(out)


def retained(c: dict) -> str:
    """Share of the reference's causal-set ablation effect still there, with its interval."""
    e = c.get("causal_effect")
    return "-" if e is None else ci(e, "{:.2f}")


def final_excess(c: dict) -> str:
    """The final phase's normalised drift minus the most-drifting earlier phase's, with its interval."""
    e = c.get("final_phase_excess")
    if e is None:  # older results, or one phase, or an undefined normalisation
        return "yes" if c["final_phase_drifts_most"] else "no"
    return ci(e, "{:+.2f}")


def evaluate_table(run_dirs: list[Path]) -> str:
    """One row per run: model, dataset, shots, n, raw and calibrated accuracy and macro-F1."""
    out = ["| model | dataset | shots | n | acc raw | acc calibrated | macro-F1 raw | macro-F1 calibrated |",
           "|---|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        r = _load(d, "evaluate")
        out.append(f"| {r['model']['name']} | {r['config']['data']['dataset']} | {r['config']['shots']} | {r['n']} | "
                   f"{ci(r['raw']['accuracy'])} | {ci(r['calibrated']['accuracy'])} | {ci(r['raw']['macro_f1'])} | "
                   f"{ci(r['calibrated']['macro_f1'])} |")
    return "\n".join(out)


TABLES = {"phases": phases, "trace": trace, "steer": steer, "audit": audit}
