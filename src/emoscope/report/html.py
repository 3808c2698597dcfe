"""Write `run_dir/report.html` from the stages' saved results: one self-contained file (plotly.js
inlined, no network), a section per stage that has run, every data string escaped by jinja2; and the
feature cards' export beside it (`run_dir/cards/`, see `report.cards`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, select_autoescape
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from ..analysis.blindspot import blind_spots
from ..analysis.difficulty import difficulty
from ..artifacts import read_json, reading
from ..errors import EmoscopeError
from ..stages.evaluate import EvalResult
from .cards import export_cards, traced_effects
from .tables import screen, weak_screens


def _html(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _confusion_figure(m: dict, title: str) -> str:
    labels = m["labels"]
    fig = go.Figure(go.Heatmap(z=m["confusion"], x=labels, y=labels, colorscale="Blues", text=m["confusion"],
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="gold", yaxis_autorange="reversed",
                      width=420, height=400, margin=dict(l=60, r=10, t=40, b=50))
    return _html(fig)


def _sae_figure(res: dict) -> str:
    q, depth = res["quality"], res["depth"]
    hooks = res["hooks"]
    x = [depth[h] for h in hooks]
    fig = make_subplots(rows=1, cols=4,
                        subplot_titles=["FVU", "CE-loss recovered", "L0", "dead latents % (training window)"])
    for col, (key, scale) in enumerate([("fvu", 1), ("ce_recovered", 1), ("l0", 1), ("dead_frac_train", 100)], 1):
        ys = [q[h].get(key) for h in hooks]
        ys = [None if y is None else y * scale for y in ys]
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=key, text=hooks,
                                 hovertemplate="%{text}<br>depth %{x:.2f}: %{y:.3f}"), row=1, col=col)
        fig.update_xaxes(title_text="depth (layer / n_layers)", row=1, col=col)
    fig.update_layout(height=330, showlegend=False, margin=dict(l=40, r=10, t=40, b=50))
    return _html(fig)


BAND_COLORS = ["rgba(99,110,250,0.10)", "rgba(0,204,150,0.10)", "rgba(239,85,59,0.10)", "rgba(171,99,250,0.10)",
               "rgba(255,161,90,0.10)"]


def _phase_bands(fig, res: dict, rows: list[dict]) -> None:
    """Shade each phase's depth range and label it with its name."""
    depths = [r["depth"] for r in rows]
    step = depths[1] - depths[0] if len(depths) > 1 else 1.0
    edges = [depths[0] - step / 2] + [depths[res["hooks"].index(f"blocks.{b['layer']}.hook_resid_post")] - step / 2
                                       if f"blocks.{b['layer']}.hook_resid_post" in res["hooks"] else b["depth"]
                                       for b in res["boundaries"]] + [depths[-1] + step / 2]
    for p, name in enumerate(res["phase_names"]):
        fig.add_vrect(x0=edges[p], x1=edges[p + 1], fillcolor=BAND_COLORS[p % 5], line_width=0,
                      annotation_text=f"{p + 1}: {name}", annotation_position="top left")


def _phases_figures(res: dict, feats: pd.DataFrame) -> dict:
    rows = res["layers"]["all"]
    x = [r["depth"] for r in rows]
    curves = make_subplots(rows=1, cols=2, subplot_titles=["what features respond to", "how decodable the emotion is"])
    for key, name in [("surface", "surface (token identity η²)"), ("semantic", "semantics (text η²)"),
                      ("selective_frac", "emotion-selective fraction")]:
        curves.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], mode="lines+markers", name=name), row=1, col=1)
    for key, name, dash in [("probe_resid", "probe on residual", None), ("probe_codes", "probe on SAE codes", None),
                            ("probe_resid_shuffled", "probe, shuffled labels", "dot"), ("lens_acc",
                                                                                        "logit lens accuracy", "dash")]:
        curves.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], mode="lines+markers", name=name,
                                    line=dict(dash=dash)), row=1, col=2)
    _phase_bands(curves, res, rows)
    curves.update_xaxes(title_text="depth (layer / n_layers)")
    curves.update_layout(height=420, margin=dict(l=40, r=10, t=60, b=50))
    layers = [r["layer"] for r in rows]
    counts = feats.groupby(["layer", "emotion"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=layers, columns=res["labels"], fill_value=0)
    heat = go.Figure(go.Heatmap(z=counts.T.values, x=[f"L{layer}" for layer in layers], y=res["labels"],
                                colorscale="Viridis",
                                hovertemplate="%{y} at %{x}: %{z} selective features"))
    heat.update_layout(title="emotion-selective features per layer", height=330, margin=dict(l=70, r=10, t=40, b=40))
    jac = go.Figure(go.Heatmap(z=res["jaccard"], x=res["labels"], y=res["labels"], colorscale="Blues", zmin=0, zmax=1,
                               text=[[f"{v:.2f}" for v in row] for row in res["jaccard"]], texttemplate="%{text}"))
    jac.update_layout(title="overlap of selective features (Jaccard)", width=460, height=420,
                      yaxis_autorange="reversed",
                      margin=dict(l=70, r=10, t=40, b=40))
    return {"phases_curves": _html(curves), "phases_heat": _html(heat), "phases_jaccard": _html(jac)}


def _trace_figure(tr: dict) -> str:
    """Top exact effect per emotion and phase, with 95% intervals, beside the random-feature control."""
    fig = go.Figure()
    for p in range(tr["n_phases"]):
        labs, vals, err_hi, err_lo = [], [], [], []
        for lab, e in tr["emotions"].items():
            r = e["phases"].get(str(p))
            if r and r["features"]:
                eff = r["features"][0]["effect"]
                labs.append(lab)
                vals.append(eff["value"])
                err_hi.append(eff["hi"] - eff["value"])
                err_lo.append(eff["value"] - eff["lo"])
        fig.add_trace(go.Bar(x=labs, y=vals, name=f"phase {p + 1} ({tr['phase_names'][p]})",
                             error_y=dict(type="data", array=err_hi, arrayminus=err_lo)))
    fig.update_layout(barmode="group", title="largest single-feature effect on the margin, by phase", height=380,
                      yaxis_title="margin drop when ablated", margin=dict(l=50, r=10, t=40, b=40))
    return _html(fig)


def _cross_figure(tr: dict) -> str:
    """Emotion x emotion matrix: margin change of B's examples when A's traced set is ablated."""
    cross = tr.get("cross_effects") or {}
    if not cross:
        return ""
    rows = list(cross)
    cols = [lab for lab in tr["labels"] if any(lab in cross[a] for a in rows)]
    z = [[cross[a].get(b) for b in cols] for a in rows]
    top = max((abs(v) for r in z for v in r if v is not None), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, colorscale="RdBu", zmid=0, zmin=-top, zmax=top,
                               text=[["" if v is None else f"{v:+.2f}" for v in r] for r in z], texttemplate="%{text}"))
    fig.update_layout(title="cross-emotion effects: margin change of column's examples when row's set is ablated",
                      xaxis_title="examples of", yaxis_title="ablated set of", height=380, margin=dict(l=80, r=10,
                                                                                                       t=40, b=50))
    return _html(fig)


def _difficulty_figure(diff: dict) -> str:
    """Per emotion, recall (95% CI) against how diffuse its causal features are and its top effect."""
    rows = {lab: r for lab, r in diff["emotions"].items() if r["effective_n"] is not None}
    if not rows:
        return ""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["recall vs effective number of causal features",
                                                        "recall vs largest single-feature effect"])
    rec = [r["recall"] for r in rows.values()]
    err = dict(type="data", symmetric=False, array=[r["hi"] - r["value"] for r in rec],
               arrayminus=[r["value"] - r["lo"] for r in rec])
    for col, x in enumerate([[r["effective_n"] for r in rows.values()],
                             [(r["top_effect"] or {}).get("value") for r in rows.values()]], 1):
        fig.add_trace(go.Scatter(x=x, y=[r["value"] for r in rec], error_y=err, mode="markers+text", text=list(rows),
                                 textposition="top center", showlegend=False), row=1, col=col)
    fig.update_xaxes(title_text="effective n (strongest phase)", row=1, col=1)
    fig.update_xaxes(title_text="margin drop (nats)", row=1, col=2)
    fig.update_yaxes(title_text="calibrated recall", row=1, col=1)
    fig.update_layout(height=380, margin=dict(l=50, r=10, t=40, b=50))
    return _html(fig)


def _dose_figure(steer: dict) -> str:
    """Share of other emotions' dev examples pushed to each target, by strength; dashed: random features."""
    dose = steer.get("dose_response") or {}
    if not dose:
        return ""
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (lab, d) in enumerate(dose.items()):
        x = [r["strength"] for r in d["curve"]]
        c = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=x, y=[r["target_pushed"] for r in d["curve"]], mode="lines+markers", name=lab,
                                 line=dict(color=c)))
        fig.add_trace(go.Scatter(x=x, y=[r["random_pushed"] for r in d["curve"]], mode="lines", name=f"{lab} (random)",
                                 line=dict(color=c, dash="dash"), showlegend=False))
    fig.update_layout(title="steering toward an emotion: share of other emotions' dev examples now predicted as it "
                            "(dashed: random features)",
                      xaxis_title="added activation (× the feature's mean dev activation)", yaxis_title="share pushed",
                      height=400, margin=dict(l=50, r=10, t=40, b=40))
    return _html(fig)


def _efficiency_figure(steer: dict) -> str:
    """Test macro-F1 of each method chosen on m dev examples per emotion, mean over subsets with 95% intervals."""
    eff = steer.get("data_efficiency") or {}
    if not eff.get("methods"):
        return ""
    fig = go.Figure()
    for name, rows in eff["methods"].items():
        y = [r["macro_f1"] for r in rows]
        err = dict(type="data", symmetric=False, array=[r["hi"] - v for r, v in zip(rows, y)],
                   arrayminus=[v - r["lo"] for r, v in zip(rows, y)])
        fig.add_trace(go.Scatter(x=[r["per_emotion"] for r in rows], y=y, mode="lines+markers", name=name,
                                 error_y=err))
    fig.update_layout(title=f"data efficiency: test macro-F1 (n = {eff['n_test']}) when chosen on m dev examples per "
                            f"emotion (mean of {eff['seeds']} subsets, 95% CI)",
                      xaxis=dict(title="dev examples per emotion", type="log", tickvals=eff["sizes"]),
                      yaxis_title="test macro-F1", height=400, margin=dict(l=50, r=10, t=40, b=40))
    return _html(fig)


def _kld_figure(spots: dict, audit: dict) -> go.Figure:
    """Emotion flip rate against llama-perplexity's mean KLD per build, with the KLD bars and the flip threshold."""
    b = spots["builds"]
    fig = go.Figure(go.Scatter(
        x=[x["mean_kld"] for x in b], y=[x["flip_rate"] for x in b], mode="markers+text",
        error_x=dict(type="data", array=[x["mean_kld_err"] for x in b], visible=True),
        text=[x["name"] for x in b], textposition="top center",
        marker=dict(color=["#c0392b" if x["audit_failed"] else "#27ae60" for x in b], size=9)))
    for rt, bar in spots["bars"].items():
        if bar["mean_kld"] is not None:
            fig.add_vline(x=bar["mean_kld"], line_dash="dot", annotation_text=f"KLD bar ({rt}: Q4_K_M)")
    fig.add_hline(y=audit["config"]["thresholds"]["max_flip_rate"], line_dash="dash",
                  annotation_text="the audit's flip threshold")
    fig.update_layout(title="emotion flips against mean KL divergence (red: fails the audit)", xaxis_type="log",
                      xaxis_title="mean KLD against the reference (nats, WikiText-2)",
                      yaxis_title="prediction flip rate", height=420, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def _audit_figures(audit: dict) -> dict:
    """Drift by depth per candidate with the phase bands, and flip rate against mean drift."""
    cands = audit["candidates"]
    if not cands:
        return {}
    norm = "normalized" in next(iter(cands[0]["drift"].values()))
    key = "normalized" if norm else "jaccard"
    depth = go.Figure()
    layers = sorted(int(layer) for layer in cands[0]["drift"])
    phase = {int(layer): d["phase"] for layer, d in cands[0]["drift"].items()}
    for p in sorted(set(phase.values())):
        ls = [layer for layer in layers if phase[layer] == p]
        depth.add_vrect(x0=min(ls) - 0.5, x1=max(ls) + 0.5, fillcolor=["#eef", "#efe", "#fee", "#ffe"][p % 4],
                        line_width=0, layer="below", annotation_text=f"phase {p + 1}", annotation_position="top left")
    curve = lambda c: [c["drift"][str(layer)][key] if norm else 1 - c["drift"][str(layer)]["jaccard"]
                       for layer in layers]
    for c in cands:
        depth.add_trace(go.Scatter(x=layers, y=curve(c), mode="lines+markers", name=c["name"]))
    unit = " (÷ drift between unrelated inputs)" if norm else " (1 − top-k Jaccard)"
    depth.update_layout(title="feature drift by depth" + unit,
                        xaxis_title="layer", yaxis_title="drift", height=420, margin=dict(l=50, r=10, t=40, b=40))
    def mean_drift(c):
        v = [x for x in curve(c) if x is not None]
        return float(np.mean(v)) if v else None
    mean = [mean_drift(c) for c in cands]
    flips = go.Figure(go.Scatter(x=mean, y=[c["flip_rate"] for c in cands], mode="markers+text",
                                 text=[c["name"] for c in cands], textposition="top center",
                                 marker=dict(color=["#c0392b" if c["failed"] else "#27ae60" for c in cands], size=9)))
    flips.update_layout(title="flip rate against mean feature drift (red: fails the thresholds)",
                        xaxis_title="mean drift",
                        yaxis_title="prediction flip rate", height=400, margin=dict(l=50, r=10, t=40, b=40))
    return {"audit_depth": _html(depth), "audit_flips": _html(flips)}


def _card_views(ph: dict | None, tr: dict | None, neuronpedia: dict) -> list[dict]:
    """Every card the phases and trace stages wrote, in layer order, with each example's tokens shaded by
    activation (alpha = value / the card's largest shown value), its selectivity and its traced effects."""
    cards = {**((ph or {}).get("cards") or {}), **((tr or {}).get("cards") or {})}
    effects = traced_effects(tr)
    out = []
    for c in sorted(cards.values(), key=lambda c: (c["layer"], c["hook"], c["feature"])):
        top = max([v for ex in c["top_examples"] + c["answer_examples"] for v in ex["values"]] + [1e-9])
        shade = lambda ex: [(t, v, round(min(max(v, 0.0) / top, 1.0), 3)) for t, v in zip(ex["tokens"], ex["values"])]  # noqa: E731
        np_id = neuronpedia.get(c["hook"])
        out.append({**c, "shaded_top": [{**ex, "shaded": shade(ex)} for ex in c["top_examples"]],
                    "shaded_answer": [{**ex, "shaded": shade(ex)} for ex in c["answer_examples"]],
                    "effects": effects.get((c["layer"], c["feature"]), []),
                    "hist_max": max(c["act_hist"]["heights"] or [1]),
                    "neuronpedia": f"{np_id}/{c['feature']}" if np_id else None})
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from every stage result the run directory holds."""
    with reading(run_dir):
        return _write_report(Path(run_dir))


def _write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run `emoscope run` or `emoscope evaluate` first")
    ev = read_json(f)
    preds = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    shares = EvalResult(ev, {"predictions": preds})
    ctx = {"ev": ev, "answers": {s: shares.answers(s) for s in ("raw", "calibrated")},
           "plotlyjs": get_plotlyjs(), "conf_raw": _confusion_figure(ev["raw"], "raw"),
           "conf_cal": _confusion_figure(ev["calibrated"], "calibrated"), "examples": preds.head(15).to_dict("records")}
    if (run_dir / "saes" / "result.json").exists():
        sae = read_json(run_dir / "saes" / "result.json")
        timing = run_dir / "saes" / "timing.json"
        ctx.update(sae=sae, sae_fig=_sae_figure(sae), sae_timing=read_json(timing) if timing.exists() else {})
    if (run_dir / "phases" / "result.json").exists():
        ph = read_json(run_dir / "phases" / "result.json")
        ctx.update(ph=ph, **_phases_figures(ph, pd.read_parquet(run_dir / "phases" / "features.parquet")))
    if (run_dir / "trace" / "result.json").exists():
        tr = read_json(run_dir / "trace" / "result.json")
        diff = tr.get("difficulty") or difficulty(ev, ctx.get("ph"), tr)  # runs from before it was stored
        ctx.update(tr=tr, trace_fig=_trace_figure(tr), cross_fig=_cross_figure(tr), screen=screen,
                   weak_screens=weak_screens(tr), diff=diff, diff_fig=_difficulty_figure(diff))
    if "ph" in ctx or "tr" in ctx:
        ctx["cards"] = _card_views(ctx.get("ph"), ctx.get("tr"), (ctx.get("sae") or {}).get("neuronpedia") or {})
    for stage in ("steer", "audit"):
        if (run_dir / stage / "result.json").exists():
            ctx[stage] = read_json(run_dir / stage / "result.json")
    if "audit" in ctx:
        ctx.update(_audit_figures(ctx["audit"]))
        spots = blind_spots(ctx["audit"]["candidates"])
        if spots is not None:
            ctx.update(blind=spots, audit_kld=_html(_kld_figure(spots, ctx["audit"])))
    if "steer" in ctx:
        ctx["dose_fig"] = _dose_figure(ctx["steer"])
        ctx["efficiency_fig"] = _efficiency_figure(ctx["steer"])
    env = Environment(loader=PackageLoader("emoscope", "report/templates"), autoescape=select_autoescape(["html"]))
    page = env.get_template("report.html").render(**ctx)
    export_cards(run_dir)
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
