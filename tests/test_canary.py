"""Canary: written from an audit, it passes the reference, catches the planted breakage as the audit does, predicts
flips from margin changes as stated, exits 0/1/2 on the command line, and refuses a bad canary in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from emoscope import canary as cn
from emoscope.errors import EmoscopeError
from emoscope.models import load_model
from emoscope.pipeline import RunContext
from emoscope.stages.audit import AuditConfig, Candidate
from emoscope.task.prompts import Template
from test_audit import CHANGED, planted_run, run_audit  # noqa: F401  (the fixture)
from test_cli import _one_line_error, cli


@pytest.fixture(scope="module")
def written(planted_run, tmp_path_factory):  # noqa: F811
    d, view, cfg, causal = planted_run
    cands = [Candidate(name="same"), Candidate(name="int8", precision="int8"),
             Candidate(name="final_token_changed", template=Template(example=CHANGED))]
    acfg = AuditConfig(candidates=cands, n_boot=100, causal_features=causal, ablation_per_emotion=3)
    res = run_audit(acfg, d / "run", view, lambda name=None: load_model(str(view.name)))
    ctx = RunContext.from_run_dir(d / "run")
    canary = cn.write(ctx.task, ctx.saes, ctx.result("evaluate"), res, config={"n": 8})
    folder = canary.save(tmp_path_factory.mktemp("canary") / "c")
    return canary, folder, ctx, res, acfg


def test_written_canary_round_trips_and_names_its_sources(written):
    canary, folder, _, res, _ = written
    back = cn.Canary.load(folder)
    assert back.meta == json.loads(json.dumps(canary.meta))
    assert set(back.arrays) == set(canary.arrays)
    assert all(np.array_equal(back.arrays[k], canary.arrays[k]) for k in canary.arrays)
    assert len(back.meta["texts"]) == 8 and back.meta["n_audited"] == res["n"]
    # tolerances from the passing 8-bit candidate only, never from the identical or the broken one
    assert back.meta["tolerance_from"] == ["int8"]
    assert (back.arrays["tolerance"] > 0).all()
    assert back.arrays["ref_active"].all()  # the planted feature fires on every reference prompt


def test_reference_passes_and_the_planted_breakage_drifts_like_the_audit(written):
    canary, _, ctx, res, acfg = written
    ok = cn.check(ctx.model, canary)
    assert ok.passed and ok.drifted == [] and ok.canary_flips == 0 and ok.causal_survival == 1.0
    assert ok.predicted_flip_rate < 0.01 and ok.out_of_band == []
    broken = cn.check(ctx.model, canary, template=Template(example=CHANGED))
    assert not broken.passed and "features" in broken.drifted and broken.causal_survival == 0.0
    assert broken.out_of_band == [f"{lab}:L2/f0" for lab in res["labels"]]
    # the verdict on each audited candidate, rebuilt as the audit builds it, is the audit's
    for row in res["candidates"]:
        cand = Candidate(name=row["name"], **row["changed"])
        assert cn.check_candidate(canary, ctx.task, cand, acfg).passed == (not row["failed"]), row["name"]


def _synthetic(margins, ref_cal, ref_pred):
    """A canary without features: its examples are the first audited ones, whose reference calibrated log-probs
    are given, beside every audited example's margin (all correct, gold = the reference's prediction)."""
    n, k = ref_cal.shape
    labels = [f"l{j}" for j in range(k)]
    meta = {"format": cn.FORMAT, "labels": labels, "task": {}, "texts": ["x"] * n,
            "gold": [labels[t] for t in ref_pred], "prompts": [[1]] * n, "label_ids": [[j] for j in range(k)],
            "ref_pred": list(ref_pred), "features": [],
            "thresholds": {"max_flip_rate": 0.2, "max_accuracy_drop": 1.0}, "demos": []}
    arrays = {"ref_cal": ref_cal, "canary_index": np.arange(n), "margins_all": np.asarray(margins, float),
              "gold_margins_all": np.zeros(len(margins)), "correct_all": np.ones(len(margins), np.uint8),
              "ref_pre": np.zeros((n, 0), np.float32), "active_at": np.zeros((n, 0), np.float32),
              "ref_active": np.zeros((n, 0), np.uint8), "tolerance": np.zeros(0, np.float32)}
    return cn.Canary(meta, arrays)


def test_flip_rate_is_observed_on_the_canary_and_predicted_for_the_rest():
    # 100 audited margins: 50 at 0.1, 50 at 5; the canary is 4 of the first (reference margin log 1.5 = 0.41).
    # Every canary margin shrinks by exactly 0.3: none of the canary flips (0.41 - 0.3 > 0), the 46 other
    # examples at 0.1 are predicted to, those at 5 not
    ref = np.log(np.array([[0.6, 0.4]] * 4))
    top = [0, 0, 0, 0]
    c = _synthetic([0.1] * 50 + [5.0] * 50, ref, top)
    shifted = ref + np.array([-0.15, 0.15])
    r = cn.judge(c, cn.CanaryObservation(shifted, np.zeros((4, 0)), []))
    assert r.canary_flips == 0 and r.predicted_flip_rate == pytest.approx(0.46) and r.drifted == ["labels"]
    assert r.predicted_accuracy_change == pytest.approx(-0.46)
    # changes of -0.2 and +0.2, half each: each of the 46 at 0.1 flips with probability 1/2, those at 5 never
    noise = np.array([[-0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, -0.5]]) * 0.2
    r = cn.judge(c, cn.CanaryObservation(ref + noise, np.zeros((4, 0)), []))
    assert r.canary_flips == 0 and r.predicted_flip_rate == pytest.approx(0.23)
    # the canary's own flips are counted as observed: all 4 flip (changes of -0.81), none of the margins at 5
    swapped = ref[:, ::-1]
    r = cn.judge(_synthetic([5.0] * 10, ref, top), cn.CanaryObservation(swapped, np.zeros((4, 0)), []))
    assert r.canary_flips == 4 and r.predicted_flip_rate == pytest.approx(0.4)
    assert r.predicted_accuracy_change == pytest.approx(-0.4)
    # a spread of margin changes that predicts a flip rate within the threshold, but with an interval crossing
    # it: 1 of 4 canary changes is -0.2 (each of the 46 margins at 0.1 flips under it), so 0.115 predicted and
    # resamples with 2+ such changes (p = 0.26) predict 0.23 > 0.2: uncertain, a fail, and no drift named
    rare = np.array([[-0.1, 0.1], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    r = cn.judge(c, cn.CanaryObservation(ref + rare, np.zeros((4, 0)), []))
    assert r.predicted_flip_rate == pytest.approx(0.115) and r.drifted == [] and r.uncertain == ["labels"]
    assert not r.passed and r.flip_rate_interval[0] == 0 and r.flip_rate_interval[1] > 0.2
    # none of the changes can flip a margin: certain, and passed
    r = cn.judge(c, cn.CanaryObservation(ref, np.zeros((4, 0)), []))
    assert r.passed and r.uncertain == [] and r.flip_rate_interval == (0.0, 0.0)
    # a non-finite row is a flip and fails the labels whatever the margins say
    bad = ref.copy()
    bad[0] = np.nan
    obs = cn.CanaryObservation(bad, np.zeros((4, 0)), [])
    assert cn.judge(_synthetic([5.0] * 10, ref, top), obs).drifted == ["labels"]


def test_canary_cli_exit_codes_and_bad_canaries(written, planted_run, tmp_path):  # noqa: F811
    _, folder, _, _, _ = written
    d, view, cfg, causal = planted_run
    model = str(cfg.model.name)
    r = cli("canary", "check", folder, "--model", model)
    assert r.returncode == 0, r.stderr
    assert "passed" in r.stdout
    r = cli("canary", "check", folder, "--model", model, "--template", yaml.safe_dump({"example": CHANGED}))
    # the features drift for certain (the planted feature reads the final token); whether the labels also drift
    # depends on the CPU's rounding of a tiny random model, so both verdicts that name the features are right
    assert r.returncode == 1 and r.stderr.strip() in ("canary: features drifted",
                                                      "canary: labels and features drifted"), r.stderr
    r = cli("canary", "check", folder, "--model", model, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["passed"] is True
    # bad canaries: one line each, exit 2
    _one_line_error(cli("canary", "check", tmp_path / "none", "--model", model), "not a canary")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "canary.json").write_text("{not json")
    (broken / "canary.safetensors").write_bytes((folder / "canary.safetensors").read_bytes())
    _one_line_error(cli("canary", "check", broken, "--model", model), "not valid JSON")
    meta = json.loads((folder / "canary.json").read_text())
    (broken / "canary.json").write_text(json.dumps({**meta, "format": 99}))
    _one_line_error(cli("canary", "check", broken, "--model", model), "unknown format 99")
    (broken / "canary.json").write_text(json.dumps({**meta, "texts": meta["texts"][:-1]}))
    _one_line_error(cli("canary", "check", broken, "--model", model), "has shape")
    (broken / "canary.json").write_text(json.dumps(meta))
    (broken / "canary.safetensors").write_bytes((folder / "canary.safetensors").read_bytes()[:100])
    _one_line_error(cli("canary", "check", broken, "--model", model), "not a readable safetensors")
    _one_line_error(cli("canary", "check", folder, "--model", model, "--template", "{example: no placeholder}"),
                    "{text} placeholder")


def test_canary_write_cli_reads_the_runs_audit(planted_run, tmp_path):  # noqa: F811
    d, view, cfg, causal = planted_run
    raw = {"run_dir": cfg.run_dir, "model": {"name": cfg.model.name}, "stages": ["evaluate", "saes"],
           "evaluate": cfg.evaluate.model_dump(mode="json"), "saes": cfg.saes.model_dump(mode="json"),
           "audit": {"candidates": [{"name": "same"}, {"name": "int8", "precision": "int8"}], "n_boot": 100,
                     "causal_features": causal, "ablation_per_emotion": 3}}
    f = tmp_path / "audit.yaml"
    f.write_text(yaml.safe_dump(raw))
    r = cli("canary", "write", "--config", f, "--n", 6, "--out", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    c = cn.Canary.load(tmp_path / "c")
    assert len(c.meta["texts"]) == 6 and c.meta["tolerance_from"] == ["int8"]
    # the canary is a stage of the run (RUN_DIR/canary, hashed on the audit's settings and its own): resumed when up
    # to date, rewritten when its size changes; the stage's folder is itself a canary
    assert "stage canary: running" in r.stderr
    again = cli("canary", "write", "--config", f, "--n", 6)
    assert "stage canary: up to date, skipped" in again.stderr, again.stderr
    folder = Path(cfg.run_dir) / "canary"
    stage = cn.CanaryResult.load(folder)
    assert stage["n"] == 6 and stage.canary.meta == c.meta and cn.Canary.load(folder).meta == c.meta
    assert "stage canary: running" in cli("canary", "write", "--config", f, "--n", 8).stderr
    _one_line_error(cli("canary", "write", "--config", f, "--n", 1), "canary.n")


def test_a_canary_needs_the_same_tokenizer(written):
    canary, _, ctx, _, _ = written
    shift = lambda ids: [(i + 7) % len(ctx.model.tokenizer) for i in ids]  # another vocabulary's ids
    other = cn.Canary(dict(canary.meta, label_ids=[shift(ids) for ids in canary.meta["label_ids"]],
                           prompts=[shift(ids) for ids in canary.meta["prompts"]]), canary.arrays)
    with pytest.raises(EmoscopeError, match="other label tokens"):
        cn.check(ctx.model, other)


def test_a_canary_with_a_confidence_outside_0_1_is_refused(written, tmp_path):
    _, folder, _, _, _ = written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "canary.safetensors").write_bytes((folder / "canary.safetensors").read_bytes())
    meta = json.loads((folder / "canary.json").read_text())
    assert meta["confidence"] == 0.9  # written from the config
    (bad / "canary.json").write_text(json.dumps({**meta, "confidence": 1.5}))
    with pytest.raises(EmoscopeError, match="confidence"):
        cn.Canary.load(bad)
