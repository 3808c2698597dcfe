"""The claims' verdict rules on planted results, and `emoscope compare` over run directories."""

import json
import subprocess
import sys

import pytest

from emoscope.analysis.claims import INCONCLUSIVE, NOT, REPRODUCED, claims


def est(v, lo, hi, n=30):
    return {"value": v, "lo": lo, "hi": hi, "n": n}


def phases(k=3, share=(0.8, 0.6, 0.95), shared=2, specific=5):
    labs = ["anger", "disgust"]
    return {"n_phases": k, "n": 120, "boundaries": [{"depth": d} for d in (0.3, 0.7)[:k - 1]],
            "last_phase_share": est(*share), "shared_counts": dict(zip(labs, (shared, 0))),
            "specific_counts": dict(zip(labs, (specific, 0)))}


def emotion(top, n80=2, rnd_hi=0.1):
    control = {"mean": 0.0, "lo": -rnd_hi, "hi": rnd_hi, "n": 8}
    return {"strongest_phase": 1, "phases": {"1": {"features": [{"effect": top}], "n_for_80": n80, "effective_n": 2.0,
                                                   "random_control": control}}}


def trace(disgust=est(0.3, 0.2, 0.4), n80=2):
    others = {lab: emotion(est(2.0, 1.5, 2.5), n80) for lab in ("anger", "fear", "joy")}
    return {"emotions": {**others, "disgust": emotion(disgust, n80)}}


def steer(fs=(0.6, 0.55, 0.65), ppl=0.01, transfer=(0.6, 0.55, 0.65)):
    f1 = lambda v: {"macro_f1": est(*v)}  # noqa: E731
    return {"n_test": 300, "side_effects": {"ppl_change": ppl, "tokens": 1000},
            "methods": {"feature_steering": {"test": f1(fs), "isear": f1(transfer)},
                        "contextual_calibration": {"test": f1((0.45, 0.4, 0.5)), "isear": f1((0.45, 0.4, 0.5))},
                        "dev_fitted_calibration": {"test": f1((0.5, 0.45, 0.54))},
                        "few_shot_dev_demos": None, "probe_steering": {"test": f1((0.3, 0.2, 0.4))}}}


def cand(name, flips, acc, excess=None, precision=None, failed=False):
    return {"name": name, "flip_rate": flips, "accuracy_change": est(acc, acc - 0.02, acc + 0.02),
            "final_phase_excess": excess, "precision": precision, "failed": failed,
            "changed": {"precision": precision} if precision else {}}  # as audit rows: `changed` says what


def audit(excess=est(0.2, 0.1, 0.3)):
    return {"candidates": [cand("paraphrase", 0.3, -0.01, excess), cand("typos", 0.05, 0.0, excess),
                           cand("int4", 0.4, -0.1, est(-0.2, -0.3, -0.1), "int4", failed=True)]}


def verdicts(**results):
    return {v.claim: v for v in claims(results)}


def test_everything_reproduced_when_planted():
    v = verdicts(phases=phases(), trace=trace(), steer=steer(), audit=audit())
    assert all(x.verdict == REPRODUCED for x in v.values()), {k: x.verdict for k, x in v.items()}
    assert v["5a silent degradation under prompt changes"].value == 0.5  # paraphrase flips silently, typos do not
    assert v["4a steering improves recognition"].value == pytest.approx(0.1)  # over dev-fitted, the best baseline
    assert len(v) == 11


def test_each_rule_can_say_no_or_inconclusive():
    v = verdicts(phases=phases(k=2, share=(0.3, 0.1, 0.45), shared=0))
    assert [v[c].verdict for c in v] == [NOT, NOT, NOT]
    assert verdicts(phases=phases(share=(0.55, 0.3, 0.8)))["1b emotion features in the last phase"].verdict \
        == INCONCLUSIVE
    assert verdicts(phases=phases(shared=0, specific=0))["2 shared and specific features"].verdict == INCONCLUSIVE
    t = verdicts(trace=trace(disgust=est(1.8, 1.0, 2.6)))
    assert t["3b Disgust weakest"].verdict == INCONCLUSIVE  # smallest, but its interval overlaps the others'
    assert verdicts(trace=trace(disgust=est(2.2, 2.0, 2.4)))["3b Disgust weakest"].verdict == NOT
    assert verdicts(trace=trace(n80=9))["3a few high-impact features per emotion"].verdict == NOT
    s = verdicts(steer=steer(fs=(0.52, 0.45, 0.6), ppl=0.2, transfer=(0.4, 0.3, 0.5)))
    assert s["4a steering improves recognition"].verdict == INCONCLUSIVE
    assert s["4b transfer to isear"].verdict == NOT and s["4c keeps language modelling"].verdict == NOT
    assert verdicts(steer=steer(fs=(0.49, 0.4, 0.55)))["4a steering improves recognition"].verdict == NOT
    a = verdicts(audit={"candidates": [cand("p", 0.05, 0.0, est(-0.2, -0.3, -0.1)),
                                       cand("q", 0.3, -0.2, est(0.1, -0.1, 0.3)),
                                       cand("int8", 0.01, 0.0, None, "int8")]})
    assert a["5a silent degradation under prompt changes"].verdict == NOT  # flips only with a visible drop
    assert a["5b last phase most fragile"].verdict == NOT and a["5c quantization breaks it"].verdict == NOT
    # library kernels and KV caches are deployment candidates, not prompt changes (their rows have no
    # top-level precision: what they changed is in `changed`)
    lib = cand("torchao", 0.5, 0.0, None, failed=True) | {"changed": {"precision": "torchao:int8"}}
    kv = cand("kv", 0.3, 0.0) | {"changed": {"kv_cache": "gguf:Q4_0"}}
    d = verdicts(audit={"candidates": [cand("p", 0.05, 0.0), lib, kv]})
    assert d["5a silent degradation under prompt changes"].n == 1 and d["5c quantization breaks it"].n == 2
    assert d["5c quantization breaks it"].verdict == REPRODUCED and d["5c quantization breaks it"].value == 0.5


def test_why_some_emotions_are_harder():
    labs = ["anger", "disgust", "fear", "joy"]
    conf = [[8, 1, 0, 1], [6, 3, 1, 0], [0, 0, 9, 1], [0, 0, 1, 9]]  # disgust mostly read as anger
    ev = {"labels": labs, "calibrated": {"confusion": conf}}
    tr = trace()
    for lab, n_eff in zip(labs + ["surprise"], (5.0, 4.0, 1.5, 6.0, 1.2)):
        tr["emotions"].setdefault(lab, emotion(est(2.0, 1.5, 2.5)))["phases"]["1"]["effective_n"] = n_eff
    tr["cross_effects"] = {"anger": {"disgust": 0.4}}
    v = verdicts(evaluate=ev, trace=tr)
    assert v["3c Disgust overshadowed by Anger"].verdict == REPRODUCED and v["3c Disgust overshadowed by Anger"].n == 10
    assert v["3c Disgust overshadowed by Anger"].value == pytest.approx(0.6)
    assert v["3d Surprise and Fear concentrated"].verdict == REPRODUCED
    assert [c for c in v][2:4] == ["3c Disgust overshadowed by Anger", "3d Surprise and Fear concentrated"]
    tr["cross_effects"] = {"anger": {"disgust": -0.4}}
    tr["emotions"]["fear"]["phases"]["1"]["effective_n"] = 7.0
    v = verdicts(evaluate=ev, trace=tr)
    assert v["3c Disgust overshadowed by Anger"].verdict == INCONCLUSIVE  # confused, but anger's set does not help
    assert v["3d Surprise and Fear concentrated"].verdict == INCONCLUSIVE  # only surprise is among the two
    ev["calibrated"]["confusion"] = [[8, 1, 0, 1], [1, 3, 6, 0], [0, 0, 9, 1], [0, 0, 1, 9]]
    assert verdicts(evaluate=ev, trace=tr)["3c Disgust overshadowed by Anger"].verdict == NOT


def _run_dir(root, name, model, evaluate=None, **results):
    d = root / name
    ev = {"model": {"name": model}, "n": 120, "config": {"data": {"dataset": "goemotions_ekman"}}, **(evaluate or {})}
    for stage, data in {"evaluate": ev, **results}.items():
        (d / stage).mkdir(parents=True)
        (d / stage / "result.json").write_text(json.dumps(data))
    return d


def test_compare_command_writes_matrix_json_and_escaped_html(tmp_path):
    labs = ["anger", "disgust", "fear", "<i>joy</i>"]  # a label with markup: escaped in the difficulty table
    tr = trace()
    tr["emotions"]["<i>joy</i>"] = tr["emotions"].pop("joy")
    tr["cross_effects"] = {"anger": {"disgust": 0.4}}
    recall = {"recall": {"value": 0.5, "lo": 0.2, "hi": 0.8, "n": 10}}
    ev = {"labels": labs, "calibrated": {"confusion": [[8, 1, 0, 1], [6, 3, 1, 0], [0, 0, 9, 1], [0, 0, 1, 9]],
                                         "per_class": dict.fromkeys(labs, recall)},
          "answers": {"raw": {"largest": "anger", "largest_share": 0.95, "degenerate": True}}}
    a = _run_dir(tmp_path, "a", "<script>alert(1)</script>", evaluate=ev, phases=phases(), trace=tr, steer=steer(),
                 audit=audit())
    b = _run_dir(tmp_path, "b", "other-model", phases=phases(k=2))
    out = tmp_path / "c" / "compare.html"
    r = subprocess.run([sys.executable, "-m", "emoscope.cli", "compare", str(a), str(b), "--out", str(out), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["runs"]) == 2 and len(got["verdicts"]) == 11 + 1 + 3  # a: all, 3c too
    page = out.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page and "not reproduced" in page
    # a degenerate predictor's column is marked, first in the matrix (b stored no answers: unknown)
    first = next(iter(json.loads(r.stdout)["runs"].values()))["raw_answers"]
    assert first["degenerate"] and "DEGENERATE predictor (95% anger): read this column" in page
    from emoscope.report.compare import ANSWERS, compare
    row = compare([a, b]).matrix()[ANSWERS]
    assert list(row.values())[0].startswith("DEGENERATE") and list(row.values())[1] == "—"
    hard = {r["emotion"]: r for r in got["difficulty"]}  # run a only: b has no trace
    assert set(hard) == set(labs) and {r["run"] for r in got["difficulty"]} == {next(iter(got["runs"]))}
    assert hard["disgust"]["partner"] == "anger" and hard["disgust"]["partner_share"] == 0.6
    assert hard["disgust"]["partner_cross_effect"] == 0.4 and hard["disgust"]["effective_n"] == 2.0
    assert hard["<i>joy</i>"]["partner"] == "fear" and hard["<i>joy</i>"]["partner_cross_effect"] is None
    assert "Why some emotions are harder" in page and "<i>joy" not in page and "&lt;i&gt;joy" in page
    assert json.loads(out.with_suffix(".json").read_text()) == got
    bad = subprocess.run([sys.executable, "-m", "emoscope.cli", "compare", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")  # an --out under a file: one line, exit 2, nothing written
    under = subprocess.run([sys.executable, "-m", "emoscope.cli", "compare", str(b), "--out",
                            str(tmp_path / "file" / "c.html")], capture_output=True, text=True)
    assert under.returncode == 2 and under.stderr.startswith("error: cannot write"), under.stderr
