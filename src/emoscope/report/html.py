"""Write `run_dir/report.html` from the stages' saved results (self-contained, escaped)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, select_autoescape

from ..artifacts import read_json
from ..errors import EmoscopeError


def _confusion_figure(m: dict, title: str) -> str:
    labels = m["labels"]
    fig = go.Figure(go.Heatmap(z=m["confusion"], x=labels, y=labels, colorscale="Blues", text=m["confusion"],
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="gold", yaxis_autorange="reversed",
                      width=420, height=400, margin=dict(l=60, r=10, t=40, b=50))
    return fig.to_html(full_html=False, include_plotlyjs=False)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run `emoscope run` or `emoscope evaluate` first")
    ev = read_json(f)
    import pandas as pd
    preds = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    env = Environment(loader=PackageLoader("emoscope", "report/templates"), autoescape=select_autoescape(["html"]))
    from plotly.offline import get_plotlyjs
    page = env.get_template("report.html").render(
        ev=ev,
        plotlyjs=get_plotlyjs(),
        conf_raw=_confusion_figure(ev["raw"], "raw"),
        conf_cal=_confusion_figure(ev["calibrated"], "calibrated"),
        examples=preds.head(40).to_dict("records"),
    )
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["write_report", "html"]
