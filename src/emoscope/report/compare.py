"""`compare(run_dirs)`: the claims matrix across runs (one column per model x dataset), from result files.

Verdicts come from `analysis.claims` (the rules, written once); this module reads the runs, lays the
verdicts out, and writes them as JSON, a markdown table and a self-contained HTML page with the phase
boundaries of every run on one depth axis.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
from plotly.offline import get_plotlyjs

from ..analysis.claims import __doc__ as claims_doc
from ..analysis.claims import claims
from ..analysis.difficulty import difficulty
from ..artifacts import read_json, reading
from ..errors import EmoscopeError
from ..stages.evaluate import EvalResult

ANSWERS = "0 the model's raw answers"
"""The matrix's first row: each run's largest raw-answer share, and whether its model is a degenerate predictor."""

STAGES = ("evaluate", "phases", "trace", "steer", "audit")
COLOURS = {"reproduced": "#1a7f37", "not reproduced": "#b42318", "inconclusive": "#9a6700"}


class Comparison:
    """Verdicts per run (`to_frame()`: one row per run and claim), the runs' labels and their phases, and
    per run and emotion why it is hard or easy (`difficulty_frame()`, from `analysis.difficulty`)."""

    def __init__(self, rows: list[dict], runs: dict[str, dict], difficulty: list[dict] | None = None):
        self.rows, self.runs, self.difficulty = rows, runs, difficulty or []

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def difficulty_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.difficulty)

    def to_dict(self) -> dict:
        """What the .json file holds: runs, verdicts and the per-emotion difficulty rows."""
        return {"runs": self.runs, "verdicts": self.rows, "difficulty": self.difficulty}

    def matrix(self) -> dict[str, dict[str, str]]:
        """claim -> run -> 'verdict (value [lo, hi], n = ...)', claims in order; '—' where a run has no verdict."""
        out: dict[str, dict[str, str]] = {ANSWERS: {run: _answers_cell(info) for run, info in self.runs.items()}}
        for r in self.rows:
            out.setdefault(r["claim"], {run: "—" for run in self.runs})[r["run"]] = _cell(r)
        return out

    def to_markdown(self) -> str:
        lines = ["| claim | " + " | ".join(self.runs) + " |", "|---" * (len(self.runs) + 1) + "|"]
        lines += [f"| {claim} | " + " | ".join(row.values()) + " |" for claim, row in self.matrix().items()]
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        """`out` (.html) and the same name with .json beside it, each written whole or not at all."""
        out = Path(out).expanduser()
        files = {out.with_suffix(".json"): json.dumps(self.to_dict(), indent=2) + "\n",
                 out: _page(self)}
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            for f, text in files.items():
                tmp = f.with_name(f".{f.name}.tmp")
                tmp.write_text(text, encoding="utf-8")
                tmp.replace(f)
        except OSError as e:
            raise EmoscopeError(f"cannot write {out}: {e.strerror or e}") from None
        return out


def _raw_answers(run_dir: Path, ev: dict) -> dict | None:
    """How a run's raw answers spread over its labels: stored, or from its predictions (older runs), or unknown."""
    if "answers" in ev:
        return ev["answers"]["raw"]
    if (run_dir / "evaluate" / "predictions.parquet").is_file():
        return EvalResult.load(run_dir / "evaluate").answers("raw")
    return None


def _answers_cell(info: dict) -> str:
    a = info.get("raw_answers")
    if not a:
        return "—"
    share = f"{a['largest_share']:.0%} {a['largest']}"
    return f"DEGENERATE predictor ({share}): read this column's verdicts with that in mind" if a["degenerate"] \
        else f"answers spread (largest share {share})"


def _cell(r) -> str:
    if r["value"] is None:
        return r["verdict"]
    num = f"{r['value']:.3g}" + (f" [{r['lo']:.3g}, {r['hi']:.3g}]" if r["lo"] is not None else "")
    return f"{r['verdict']} ({num}" + (f", n = {r['n']})" if r["n"] is not None else ")")


def compare(run_dirs: list[str | Path]) -> Comparison:
    """The claims matrix of several runs (each a run directory with at least an evaluate result)."""
    if not run_dirs:
        raise EmoscopeError("compare needs at least one run directory")
    rows, runs, diff = [], {}, []
    for d in map(Path, run_dirs):
        if not (d / "evaluate" / "result.json").is_file():
            raise EmoscopeError(f"{d} is not a run directory (no evaluate/result.json)")
        with reading(d):
            res = {s: read_json(d / s / "result.json") for s in STAGES if (d / s / "result.json").is_file()}
            ev = res["evaluate"]
            label = f"{ev['model']['name']} × {Path(str(ev['config']['data']['dataset'])).stem}"
            label = label if label not in runs else f"{label} ({d})"
            answers = _raw_answers(d, ev)
            runs[label] = {"run_dir": str(d), "n": ev["n"], "raw_answers": answers,
                           "boundaries": [b["depth"] for b in res.get("phases", {}).get("boundaries", [])]}
            rows += [{"run": label, **v._asdict()} for v in claims(res)]
            if "trace" in res and "calibrated" in ev:
                diff += _difficulty_rows(label, res)
    return Comparison(rows, runs, diff)


def _difficulty_rows(run: str, res: dict) -> list[dict]:
    """One flat row per emotion of a run: recall, main confusion partner, concentration, partner effect."""
    d = difficulty(res["evaluate"], res.get("phases"), res["trace"])  # today's rules on every run, as the claims
    out = []
    for lab, r in d["emotions"].items():
        part = r["partners"][0] if r["partners"] else {"label": None, "share": 0.0}
        out.append({"run": run, "emotion": lab, "recall": r["recall"]["value"], "recall_lo": r["recall"]["lo"],
                    "recall_hi": r["recall"]["hi"], "partner": part["label"], "partner_share": part["share"],
                    "effective_n": r["effective_n"], "n_for_80": r["n_for_80"],
                    "top_effect": (r["top_effect"] or {}).get("value"), "beats_random": r["beats_random"],
                    "partner_cross_effect": (r["partner_cross_effect"] or {}).get("value")})
    return out


def _difficulty_table(c: Comparison) -> str:
    """Emotion x run: recall, the label it is mistaken for most, effective n of causal features, and the
    margin change when that label's causal set is ablated."""
    if not c.difficulty:
        return ""
    runs = list(dict.fromkeys(r["run"] for r in c.difficulty))
    cells: dict[str, dict[str, str]] = {}
    for r in c.difficulty:
        txt = f"recall {r['recall']:.2f}"
        txt += f" · mistaken for {r['partner']} {r['partner_share']:.0%}" if r["partner"] else ""
        txt += f" · eff. n {r['effective_n']:.1f}" if r["effective_n"] is not None else " · not traced"
        cross = r["partner_cross_effect"]
        txt += f" · partner's set ablated {cross:+.2f}" if cross is not None else ""
        cells.setdefault(r["emotion"], {})[r["run"]] = txt
    head = "".join(f"<th>{html.escape(r)}</th>" for r in runs)
    body = "".join(f"<tr><th>{html.escape(e)}</th>" + "".join(f"<td>{html.escape(row.get(r, '—'))}</td>" for r in runs)
                   + "</tr>\n" for e, row in cells.items())
    return f"<h2>Why some emotions are harder</h2><table><tr><th>emotion</th>{head}</tr>\n{body}</table>"


def _page(c: Comparison) -> str:
    head = "".join(f"<th>{html.escape(r)}</th>" for r in c.runs)
    body = ""
    for claim, row in c.matrix().items():
        colour = lambda v: COLOURS.get(v.split(" (")[0], "#b42318" if v.startswith("DEGENERATE") else "#555")
        cells = "".join(f'<td style="color:{colour(v)}">{html.escape(v)}</td>' for v in row.values())
        body += f"<tr><th>{html.escape(claim)}</th>{cells}</tr>\n"
    traces = [{"x": r["boundaries"], "y": [name] * len(r["boundaries"]), "mode": "markers", "type": "scatter",
               "name": name, "marker": {"size": 12, "symbol": "line-ns-open"}} for name, r in c.runs.items()]
    layout = {"title": "phase boundaries by depth (layer / n_layers)", "xaxis": {"range": [0, 1], "title": "depth"},
              "height": 120 + 40 * len(c.runs), "margin": {"l": 260}}
    fig = json.dumps({"data": traces, "layout": layout}).replace("</", "<\\/")
    rules = html.escape(claims_doc or "")
    hard = _difficulty_table(c)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>emoscope: claims across runs</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}}pre{{white-space:pre-wrap}}</style>
<script>{get_plotlyjs()}</script></head><body><h1>The paper's claims, run by run</h1>
<table><tr><th>claim</th>{head}</tr>
{body}</table><div id="depth"></div>
<script>var f={fig};Plotly.newPlot("depth",f.data,f.layout);</script>
{hard}
<h2>Rules</h2><pre>{rules}</pre></body></html>
"""
