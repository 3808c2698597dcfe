"""`emoscope run`: stages into a run directory, skip when up to date, escaped HTML report."""

import json

import pytest
import torch
import yaml

from emoscope.config import RunConfig
from emoscope.pipeline import run


def _cfg(tmp_path, tiny_dir, data):
    return RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "model": {"name": str(tiny_dir), "dtype": "float32"},
        "stages": ["evaluate"],
        "evaluate": {"data": {"dataset": str(data), "per_class": 3}, "shots": 1},
    })


def test_run_skips_up_to_date_stage_and_escapes_report(tmp_path, tiny_dir, toy_data):
    data = tmp_path / "planted.csv"
    # every text carries markup: it must reach the report as text, never as markup
    rows = toy_data.read_text().splitlines()
    rows = rows[:1] + [r.replace("I feel", "<script>window.__pwned=1</script> <b>I</b> feel") for r in rows[1:]]
    data.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, tiny_dir, data)
    logs = []
    report = run(cfg, log=logs.append)
    result = tmp_path / "run" / "evaluate" / "result.json"
    first = result.read_bytes()
    html = report.read_text()
    assert "<script>window.__pwned" not in html and "<b>I</b>" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt; &lt;b&gt;I&lt;/b&gt; feel" in html
    assert "Task accuracy" in html and "plotly" in html.lower()
    logs.clear()
    run(cfg, log=logs.append)
    assert any("up to date" in line for line in logs) and result.read_bytes() == first
    logs.clear()
    run(cfg, force={"evaluate"}, log=logs.append)
    assert not any("up to date" in line for line in logs) and result.read_bytes() == first  # deterministic


def test_changed_key_reruns(tmp_path, tiny_dir, toy_data):
    cfg = _cfg(tmp_path, tiny_dir, toy_data)
    run(cfg, log=lambda s: None)
    h1 = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["config_hash"]
    cfg.evaluate.seed = 1
    logs = []
    run(cfg, log=logs.append)
    h2 = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["config_hash"]
    assert h1 != h2 and not any("up to date" in line for line in logs)


def test_quick_config_is_valid():
    from emoscope.config import load_config
    cfg = load_config("quick")  # shipped inside the package, found by name
    assert cfg.model.name == "gemma3-270m" and cfg.run_dir == "runs/demo"
    from emoscope.config import STAGES
    assert tuple(cfg.stages) + ("canary", "sensitivity") == STAGES  # the whole analysis (the deployment tools: later)


def test_deploy_config_reuses_a_quick_run():
    """The shipped deployment gate has the quick profile's upstream stages, so a quick run's directory
    is reused (only the audit runs), and its candidates cover the deployed formats."""
    from emoscope.config import load_config
    quick, deploy = load_config("quick"), load_config("deploy")
    for stage in ("evaluate", "saes", "phases", "trace"):
        assert deploy.stage_hash(stage) == quick.stage_hash(stage), stage
    kinds = {k for c in deploy.audit.candidates for k in ("precision", "kv_cache", "template", "text")
             if getattr(c, k) is not None}
    assert kinds == {"precision", "kv_cache", "template", "text"}


def test_saes_and_phases_stages_on_tiny_model(tmp_path, tiny_dir, toy_data, shared_data):
    from emoscope.models import load_model
    from emoscope.sae.pretrained import load_saes

    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)}, "stages": ["evaluate", "saes", "phases"],
        "evaluate": {"data": {"dataset": str(toy_data), "per_class": 6}},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 3},
        "saes": {"train": {"tokens": 4000, "layers": [1, 3], "expansion": 4, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 8},
    })
    run(cfg, log=lambda s: None)
    res = json.loads((tmp_path / "run" / "saes" / "result.json").read_text())
    assert res["hooks"] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    for q in res["quality"].values():
        assert q["l0"] <= 4 + 1e-9 and 0 <= q["fvu"] < 1.0 and q["n_tokens"] > 100 and "ce_recovered" in q
    view = load_model(str(tiny_dir))
    saes = load_saes(tmp_path / "run", view)
    assert set(saes) == set(res["hooks"]) and saes["blocks.1.hook_resid_post"].cfg.k == 4
    ph = json.loads((tmp_path / "run" / "phases" / "result.json").read_text())
    assert [r["layer"] for r in ph["layers"]["all"]] == [1, 3] and ph["n"] == 36
    assert 1 <= ph["n_phases"] <= 2 and set(ph["top_features"]) == set(res_labels(tmp_path))
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Phases of the information flow" in html and "Sparse autoencoders by layer" in html
    prof = json.loads((tmp_path / "run" / "saes" / "timing.json").read_text())["profile"]
    assert prof["sae_train"] > 0 and prof["llm_forward"] > 0 and "llm_forward:sae_quality" in prof
    logs = []
    run(cfg, log=logs.append)
    assert "stage saes: up to date, skipped" in logs and "stage phases: up to date, skipped" in logs
    cfg.phases.fdr = 0.1  # only the phases stage depends on this key
    logs.clear()
    run(cfg, log=logs.append)
    assert "stage saes: up to date, skipped" in logs and "stage phases: running" in logs


def test_trace_stage_on_tiny_model(tmp_path, tiny_dir, toy_data, shared_data):
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)}, "stages": ["evaluate", "saes", "phases",
                                                                                       "trace"],
        "evaluate": {"data": {"dataset": str(toy_data), "per_class": 4}},
        "saes": {"train": {"tokens": 3000, "layers": [1, 3], "expansion": 2, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 4, "ce": False},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 2},
        "trace": {"examples": "all", "per_emotion": 3, "candidates": 2, "n_random": 3, "n_boot": 50},
    })
    run(cfg, log=lambda s: None)
    tr = json.loads((tmp_path / "run" / "trace" / "result.json").read_text())
    assert set(tr["emotions"]) | set(tr["skipped"]) == set(res_labels(tmp_path))
    # which labels the first-token margin only approximates is recorded and shown
    assert set(tr["label_first_tokens"]) == set(res_labels(tmp_path))
    multi = [lab for lab, t in tr["label_first_tokens"].items() if t["n_tokens"] > 1]
    from emoscope.report.tables import trace as trace_table
    table = trace_table(tmp_path / "run")
    assert ("proxy: " + multi[0]) in table if multi else "proxy" not in table
    for lab, e in tr["emotions"].items():
        for p in e["phases"].values():
            assert len(p["features"]) <= 2 and p["random_control"]["n"] == 3
            assert isinstance(p["shuffled_label_top_attribution"], float) and isinstance(p["top_attribution"], float)
            # the control draws among features active on the traced examples (k = 4 per token), not all 64 per layer
            assert 0 < p["random_control"]["pool"] <= 4 * e["n"] * len(p["layers"]) < 64 * len(p["layers"])
            for f in p["features"]:
                assert f["effect"]["lo"] <= f["effect"]["value"] <= f["effect"]["hi"]
            # the screen's measured validity: sampled live features ablated exactly beside the validated ones
            c = p["screen_check"]
            if c is not None:
                assert 0 < c["sampled"] <= 8 and c["spearman"]["n"] == len(p["features"]) + c["sampled"]
                assert 0 <= c["top_recall"]["value"] <= 1 and c["top_recall"]["k"] == len(p["features"])
                best = max(f["effect"]["value"] for f in p["features"])
                assert all(e > best for _, _, e in c["beats_best"])
                assert c["flagged"] == bool(not c["spearman"]["value"] >= 0.5 or c["beats_best"])
    # why some emotions are harder: a row per label, read from this run's own evaluation and trace
    ev = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())
    diff = tr["difficulty"]["emotions"]
    assert list(diff) == ev["labels"]
    for lab, r in diff.items():
        assert r["recall"] == ev["calibrated"]["per_class"][lab]["recall"] and r["traced"] == (lab in tr["emotions"])
        if r["partner_cross_effect"] is not None:
            assert r["partner_cross_effect"]["value"] == tr["cross_effects"][r["partners"][0]["label"]][lab]
            assert r["partner_cross_effect"]["lo"] <= r["partner_cross_effect"]["value"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Why some emotions are harder" in html
    # a card for every feature the run names: phases' top features and trace's validated ones
    ph = json.loads((tmp_path / "run" / "phases" / "result.json").read_text())
    cards = {**ph["cards"], **tr["cards"]}
    assert not set(ph["cards"]) & set(tr["cards"])  # trace adds only the cards phases has not made
    named = {(f["layer"], f["feature"]) for e in tr["emotions"].values() for p in e["phases"].values()
             for f in p["features"]} | {(f["layer"], f["feature"]) for fs in ph["top_features"].values() for f in fs}
    assert named == {(c["layer"], c["feature"]) for c in cards.values()}
    for layer, f in named:
        assert f'id="feature-{layer}-{f}"' in html
    assert "background:rgba(255,140,0," in html  # per-token shading
    exported = json.loads((tmp_path / "run" / "cards" / "cards.json").read_text())
    assert set(exported) == set(cards)
    batch = json.loads((tmp_path / "run" / "cards" / "blocks.3.hook_resid_post.json").read_text())
    assert {f["feature_index"] for f in batch["features"]} == {c["feature"] for c in cards.values() if c["layer"] == 3}
    # screen: exact reruns the trace stage alone; no screen check there, and the report says how it ranked
    cfg.trace = cfg.trace.model_validate({**cfg.trace.model_dump(), "screen": "exact"})
    logs = []
    run(cfg, log=logs.append)
    assert "stage trace: running" in logs and "stage phases: up to date, skipped" in logs
    ex = json.loads((tmp_path / "run" / "trace" / "result.json").read_text())
    assert ex["config"]["screen"] == "exact" and all("screen_check" not in p for e in ex["emotions"].values()
                                                     for p in e["phases"].values())
    assert "(trace.screen: exact)" in trace_table(tmp_path / "run")
    assert "<code>trace.screen: exact</code>): the screen check" in (tmp_path / "run" / "report.html").read_text()
    cfg.stages.append("steer")
    cfg.steer = cfg.steer.model_validate({"dev_per_class": 3, "features_per_emotion": [1], "strengths": [2.0],
                                          "transfer": ["isear"], "transfer_per_class": 2, "ppl_seqs": 2, "n_boot": 100,
                                          "efficiency_sizes": [1, 3, 64], "efficiency_seeds": 2})
    run(cfg, log=lambda s: None)
    st = json.loads((tmp_path / "run" / "steer" / "result.json").read_text())
    assert set(st["methods"]) == {"raw", "contextual_calibration", "dev_fitted_calibration", "few_shot_dev_demos",
                                  "probe_steering", "random_features", "feature_steering"}
    assert all("isear" in m for m in st["methods"].values()) and st["side_effects"]["tokens"] > 0
    steering = json.loads((tmp_path / "run" / "steer" / "steering.json").read_text())
    test_ids = set(pd_ids(tmp_path))
    assert not test_ids & set(steering["chosen_on"]["dev_ids"])  # no test example in the search
    # per-emotion strengths: searched after the common one, the chosen point is the best dev point seen,
    # and the saved edits carry each emotion's chosen scale (emotions left at 1 have no edit)
    ch = st["chosen"]
    assert any("strengths" in c for c in st["search"])
    assert ch["dev_macro_f1"] == max(c["dev_macro_f1"] for c in st["search"])
    assert {e["value"] for e in steering["edits"]} <= set(ch["strengths"].values()) - {1.0}
    assert len(steering["edits"]) == st["n_features"] > 0
    # dose-response toward each emotion: at strength 0 the target and random pushes are the same no-op
    assert st["dose_response"]
    for d in st["dose_response"].values():
        zero = [r for r in d["curve"] if r["strength"] == 0][0]
        assert zero["target_pushed"] == zero["random_pushed"] and zero["target_prob"] == zero["random_prob"]
    # data efficiency: sizes up to dev_per_class; at the whole dev set every subset is the dev set itself, so the
    # baselines' test macro-F1 equals the main results' and does not vary over subsets
    eff = st["data_efficiency"]
    assert eff["sizes"] == [1, 3] and eff["seeds"] == 2 and eff["n_test"] == st["n_test"]
    assert set(eff["methods"]) == {"feature_steering", "dev_fitted_calibration", "probe_steering", "few_shot_dev_demos"}
    for name, rows in eff["methods"].items():
        assert [r["per_emotion"] for r in rows] == [1, 3] and all(r["n_subsets"] == 2 for r in rows)
        assert all(0 <= r["lo"] <= r["hi"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in rows)
        whole = rows[1]
        assert whole["sd_over_subsets"] == 0
        if name != "feature_steering":  # the curve's steering search is the common one only
            assert whole["macro_f1"] == pytest.approx(st["methods"][name]["test"]["macro_f1"]["value"], abs=1e-12)
    _empty_dev_set_is_refused(tmp_path / "run", toy_data, tiny_dir, cfg.steer)
    cfg.stages.remove("steer")
    cfg.trace.examples = "correct"  # a random tiny model gets few right: those emotions are skipped, not crashed on
    cfg.trace.per_emotion = 2
    run(cfg, log=lambda s: None)
    tr = json.loads((tmp_path / "run" / "trace" / "result.json").read_text())
    assert tr["skipped"] and all("correct examples" in v for v in tr["skipped"].values())


def _empty_dev_set_is_refused(run_dir, toy_data, tiny_dir, steer_cfg):
    """The same run pointed at a copy of its data without dev rows: steering refuses in one line, writes nothing."""
    import pytest

    from emoscope.data import _hash_split
    from emoscope.errors import EmoscopeError
    from emoscope.pipeline import RunContext, run_stage

    lines = toy_data.read_text().splitlines()
    no_dev = run_dir.parent / "no_dev.csv"
    kept = [line for line in lines[1:] if _hash_split(line.split(",")[0]) != "dev"]
    no_dev.write_text("\n".join([lines[0]] + kept) + "\n")
    ev_path = run_dir / "evaluate" / "result.json"
    original = ev_path.read_bytes()
    ev = json.loads(original)
    ev["config"]["data"]["dataset"] = str(no_dev)
    ev_path.write_text(json.dumps(ev))
    before = (run_dir / "steer" / "result.json").read_bytes()
    try:
        with pytest.raises(EmoscopeError, match="no examples of .* steering needs a labelled dev set") as e:
            run_stage(RunContext.from_run_dir(run_dir), "steer", steer_cfg)
    finally:
        ev_path.write_bytes(original)
    assert "\n" not in str(e.value) and (run_dir / "steer" / "result.json").read_bytes() == before


def pd_ids(tmp_path):
    import pandas as pd
    return pd.read_parquet(tmp_path / "run" / "evaluate" / "predictions.parquet").id


def res_labels(tmp_path):
    return json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["labels"]


def test_config_doc_is_generated_from_the_code():
    """docs/config.md is `emoscope config-keys`: a default or key changed in the code fails here."""
    from pathlib import Path
    from emoscope.config import config_doc
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert doc == config_doc(), "docs/config.md is stale: regenerate it with `emoscope config-keys > docs/config.md`"


def test_sae_training_is_deterministic(tmp_path, tiny_dir, shared_data):
    from emoscope.models import load_model
    from emoscope.stages.saes import train_saes

    view = load_model(str(tiny_dir))
    cfg = {"train": {"tokens": 3000, "layers": [2], "expansion": 2, "k": 4, "batch_tokens": 256,
                     "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 4, "ce": False}
    a, b = train_saes(view, cfg), train_saes(view, cfg)
    a.save(tmp_path / "a" / "saes")
    b.save(tmp_path / "b" / "saes")
    w = "saes/blocks.2.hook_resid_post/sae_weights.safetensors"
    assert (tmp_path / "a" / w).read_bytes() == (tmp_path / "b" / w).read_bytes()
    assert a["quality"] == b["quality"]
    assert (tmp_path / "a/saes/result.json").read_bytes() == (tmp_path / "b/saes/result.json").read_bytes()
    # the result loads back as it was saved (symmetric save/load)
    from emoscope.stages.saes import SAEsResult
    c = SAEsResult.load(tmp_path / "a" / "saes", view)
    assert c.data == a.data and list(c.saes) == list(a.saes)
    assert all(torch.equal(c.saes[h].W_dec, a.saes[h].W_dec) for h in a.saes)


_PAUSE_IN_WRITE = """
import os, pathlib, time
from emoscope.stages import base

_write = base.StageResult._write


def _paused(self, folder):
    _write(self, folder)
    if self.stage == os.environ.get("EMOSCOPE_TEST_PAUSE_STAGE"):
        pathlib.Path(os.environ["EMOSCOPE_TEST_PAUSED"]).touch()
        time.sleep(600)


base.StageResult._write = _paused
"""


def _tiny_run_yaml(tmp_path, tiny_dir, toy_data, name):
    cfg = {
        "run_dir": str(tmp_path / name), "model": {"name": str(tiny_dir)}, "stages": ["evaluate", "saes", "phases",
                                                                                      "trace"],
        "evaluate": {"data": {"dataset": str(toy_data), "per_class": 4}},
        "saes": {"train": {"tokens": 24000, "layers": [1, 2, 3], "expansion": 4, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 8},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 2},
        "trace": {"examples": "all", "per_emotion": 3, "candidates": 2, "n_random": 3, "n_boot": 50},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _results(run_dir):
    """Every stage file except wall-clock timings, by path relative to the run directory."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("timing.json", "run.log", "report.html")}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_dir, toy_data, shared_data):
    """Kill `emoscope run` with SIGKILL inside the saes stage, then inside phases, each time while the stage is
    half-way through writing its result; the rerun resumes and its results are byte-identical to an
    uninterrupted run's (which also shows determinism). The pause is planted by a `sitecustomize` on the
    child's path, so the kill lands at the same point on any CPU (a timed kill missed on a fast one)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    hook = tmp_path / "pause"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_PAUSE_IN_WRITE)
    cli = [sys.executable, "-m", "emoscope.cli", "run", "--config"]
    killed = _tiny_run_yaml(tmp_path, tiny_dir, toy_data, "killed")
    run_dir = tmp_path / "killed"
    for stage in ("saes", "phases"):
        paused = tmp_path / f"paused-{stage}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
               "EMOSCOPE_TEST_PAUSE_STAGE": stage, "EMOSCOPE_TEST_PAUSED": str(paused)}
        proc = subprocess.Popen(cli + [str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not paused.exists():
            time.sleep(0.02)
        assert paused.exists() and proc.poll() is None, f"the run never paused in the {stage} stage"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (run_dir / stage / "result.json").exists()
        assert list(run_dir.glob(f".{stage}.tmp-*/result.json"))  # killed half-way through writing
    before = (run_dir / "run.log").read_text()
    rerun = subprocess.run(cli + [str(killed)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = (run_dir / "run.log").read_text()[len(before):]
    assert "stage evaluate: up to date, skipped" in log and "stage saes: up to date, skipped" in log
    assert "stage phases: running" in log and "stage trace: running" in log
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # killed stages' leftovers are gone
    clean = _tiny_run_yaml(tmp_path, tiny_dir, toy_data, "clean")
    out = subprocess.run(cli + [str(clean)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = _results(run_dir), _results(tmp_path / "clean")
    assert set(a) == set(b) and any(k.startswith("trace/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, tiny_dir, toy_data):
    import subprocess
    import sys

    import pytest

    from emoscope.errors import EmoscopeError
    from emoscope.pipeline import run_lock

    cfg = _cfg(tmp_path, tiny_dir, toy_data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cli = [sys.executable, "-m", "emoscope.cli", "run", "--config", str(path)]
    with run_lock(run_dir):  # this process holds the run directory, as a running `emoscope run` would
        with pytest.raises(EmoscopeError, match="is in use by process"):
            with run_lock(run_dir):
                pass
        r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
            f"error: run directory {run_dir} is in use by process {__import__('os').getpid()} on "
            f"{__import__('socket').gethostname()}; wait for it, or delete {run_dir / '.lock'} if that run is gone"]
        assert not (run_dir / "evaluate").exists()
    # a lock left by a process that is gone (killed) is taken over, with a note in the log
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": __import__("socket").gethostname()}))
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "taking over the lock" in (run_dir / "run.log").read_text() and not (run_dir / ".lock").exists()


def test_report_shows_the_largest_answer_share_and_warns_on_a_degenerate_predictor(tmp_path, tiny_llama, toy_data):
    """The share of the most frequent answer stands beside the accuracy; above half, a warning says the model is a
    degenerate predictor; a result written before shares were stored gets them from its predictions."""
    import emoscope as es
    from emoscope.report.html import write_report
    from emoscope.task.metrics import answer_shares

    assert answer_shares([0, 0, 1, 2], ["a", "b", "c"]) == {
        "shares": {"a": 0.5, "b": 0.25, "c": 0.25}, "largest": "a", "largest_share": 0.5, "degenerate": False}
    assert answer_shares([2, 2, 1], ["a", "b", "c"])["degenerate"]
    ev = es.evaluate(es.Task(tiny_llama, dataset=str(toy_data), per_class=4))
    ev.save(tmp_path / "run" / "evaluate")
    html = write_report(tmp_path / "run").read_text()
    raw = ev.answers("raw")
    assert "largest label share" in html and f"{raw['largest_share']:.2f} ({raw['largest']})" in html
    assert ("Degenerate predictor" in html) == raw["degenerate"] == ev.degenerate
    data = {k: v for k, v in ev.data.items() if k != "answers"}  # an older result
    preds = ev.predictions.assign(pred_raw=ev.labels[1])  # every raw answer one label
    es.EvalResult(data, {"predictions": preds}).save(tmp_path / "old" / "evaluate")
    html = write_report(tmp_path / "old").read_text()
    assert f"<b>{ev.labels[1]}</b> for 100% of the texts" in html and "Degenerate predictor" in html


def test_every_stage_is_registered_once_and_everything_reads_the_registry():
    """A stage is one object (`stages.registry`): its run-config section has its config type, its hash inputs and
    needed results come before it, its printer exists, and the CLI has a command for it."""
    from emoscope.cli import app
    from emoscope.config import RunConfig
    from emoscope.report import console
    from emoscope.stages.registry import REGISTRY, STAGES

    assert STAGES == ("evaluate", "saes", "phases", "trace", "steer", "audit", "canary", "sensitivity")
    from emoscope.cli import canary_app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    canary_commands = {c.name for c in canary_app.registered_commands}
    for i, (name, st) in enumerate(REGISTRY.items()):
        assert st.name == name and RunConfig.model_fields[name].annotation is st.config, name
        assert set(st.upstream) | set(st.needs) <= set(STAGES[:i]), name
        assert callable(getattr(console, st.printer)) and st.summary, name
        assert {"saes": "train-saes", "canary": "write"}.get(name, name) in commands | canary_commands, name


def test_preflight_takes_the_default_audit_candidates():
    """The full profile audits the default candidates (the string 'default'): preflight used to iterate over it
    as if it were a list and stopped every `emoscope run --config full` with an internal error."""
    from emoscope.config import load_config
    from emoscope.pipeline import preflight

    cfg = load_config("full")
    assert cfg.audit.candidates == "default" and "audit" in cfg.stages
    preflight(cfg)
