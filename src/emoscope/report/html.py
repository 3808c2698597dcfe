"""Write `run_dir/report.html` from the stages' saved results: one self-contained file (plotly.js
inlined, no network), a section per stage that has run, every data string escaped by jinja2."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, select_autoescape
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from ..artifacts import read_json
from ..errors import EmoscopeError


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
    fig = make_subplots(rows=1, cols=4, subplot_titles=["FVU", "CE-loss recovered", "L0", "dead latents"])
    for col, (key, scale) in enumerate([("fvu", 1), ("ce_recovered", 1), ("l0", 1), ("dead_frac", 100)], 1):
        ys = [q[h].get(key) for h in hooks]
        ys = [None if y is None else y * scale for y in ys]
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=key, text=hooks,
                                 hovertemplate="%{text}<br>depth %{x:.2f}: %{y:.3f}"), row=1, col=col)
        fig.update_xaxes(title_text="depth (layer / n_layers)", row=1, col=col)
    fig.update_layout(height=330, showlegend=False, margin=dict(l=40, r=10, t=40, b=50))
    return _html(fig)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run `emoscope run` or `emoscope evaluate` first")
    ev = read_json(f)
    preds = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    ctx = {"ev": ev, "plotlyjs": get_plotlyjs(), "conf_raw": _confusion_figure(ev["raw"], "raw"),
           "conf_cal": _confusion_figure(ev["calibrated"], "calibrated"), "examples": preds.head(40).to_dict("records")}
    if (run_dir / "saes" / "result.json").exists():
        sae = read_json(run_dir / "saes" / "result.json")
        timing = run_dir / "saes" / "timing.json"
        ctx.update(sae=sae, sae_fig=_sae_figure(sae), sae_timing=read_json(timing) if timing.exists() else {})
    env = Environment(loader=PackageLoader("emoscope", "report/templates"), autoescape=select_autoescape(["html"]))
    page = env.get_template("report.html").render(**ctx)
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
