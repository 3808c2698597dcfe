"""The sensitivity plot: flip rate against depth, one group at the target type ('only') and one group kept high
('keep'), the phase boundaries marked; one self-contained HTML file (plotly.js inline, works offline)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs


def figure(res: dict) -> go.Figure:
    cfg, rows = res["config"], [r for r in res["groups"] if r["first_layer"] is not None]
    fig = go.Figure()
    for direction, name in (("only", f"only this group at {cfg['target']} (rest F32)"),
                            ("keep", f"this group at {cfg['high']}, rest {cfg['target']}")):
        rs = [r for r in rows if r["direction"] == direction]
        if rs:
            fig.add_scatter(x=[r["first_layer"] for r in rs], y=[r["flip_rate"] for r in rs], mode="lines+markers",
                            name=name, text=[r["group"] for r in rs])
    for u, r in res["uniform"].items():
        fig.add_hline(y=r["flip_rate"], line_dash="dot", annotation_text=u.replace("_", " "))
    fig.add_hline(y=res["thresholds"]["max_flip_rate"], line_color="red", annotation_text="gate: max_flip_rate")
    prev = None
    for r in sorted(rows, key=lambda r: r["first_layer"]):
        if prev is not None and r["phase"] != prev["phase"]:
            fig.add_vline(x=r["first_layer"] - 0.5, line_dash="dash", line_color="grey",
                          annotation_text=f"phase {r['phase']}")
        prev = r
    fig.update_layout(xaxis_title="layer", yaxis_title="share of predictions flipped", height=460,
                      title=f"Where {cfg['target']} breaks emotion inference ({res['model']}, n={res['n']}, llama.cpp)")
    return fig


def write(res: dict, path: str | Path) -> Path:
    """The plot and the recipe as one HTML page at `path`."""
    path = Path(path)
    div = figure(res).to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
    recipe = res.get("recipe") or {}
    cmd = html.escape(recipe.get("command", ""))
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>sensitivity</title>"
                    f"<script>{get_plotlyjs()}</script></head><body><h1>Layer sensitivity: "
                    f"{html.escape(str(res['model']))}</h1>{div}<h2>Recipe</h2><pre>{cmd}</pre></body></html>")
    return path
