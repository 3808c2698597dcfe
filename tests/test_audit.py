"""Audit: an identical candidate shows no drift and no flips; a planted perturbation that silences a
causal feature is flagged; the CLI's exit code follows the thresholds; bad candidates are refused."""


import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from emoscope.errors import EmoscopeError
from emoscope.models import load_model
from emoscope.pipeline import RunContext
from emoscope.stages.audit import AuditConfig, Candidate, audit
from emoscope.task.prompts import Template
from emoscope.config import RunConfig
from emoscope.pipeline import run
from emoscope.sae import SAE, SAEConfig
from emoscope.sae.io import save
from test_cli import _one_line_error, cli


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_dir, toy_data, shared_data):
    """A run whose layer-2 SAE has one JumpReLU feature that fires on the reference prompt's final
    token, listed as the causal feature of every emotion."""
    d = tmp_path_factory.mktemp("audit")
    cfg = RunConfig.model_validate({"run_dir": str(d / "run"), "model": {"name": str(tiny_dir)}, "stages": ["evaluate"],
                                    "evaluate": {"data": {"dataset": str(toy_data), "per_class": 3}}})
    run(cfg, log=lambda s: None)
    ctx = RunContext.from_run_dir(d / "run")
    view, task, ev = ctx.model, ctx.task, ctx.result("evaluate")
    texts = list(ev.predictions.text)
    from emoscope.hooks import HookPoint, record

    def final_resid(builder):
        with torch.no_grad(), record(view, [HookPoint(2)]) as acts:
            xs = []
            for t in texts:
                view.model(input_ids=torch.tensor([builder.encode(builder.prompt(t))]))
                xs.append(acts["blocks.2.hook_resid_post"][0, -1])
        return torch.stack(xs)

    x = final_resid(task.builder)
    changed = task.variant(template={"example": CHANGED})
    xc = final_resid(changed.builder)
    # a feature reading what tells the reference's final token from the changed one
    direction = (x.mean(0) - xc.mean(0)) / (x.mean(0) - xc.mean(0)).norm()
    sae = SAE(SAEConfig(d_in=32, d_sae=4, architecture="jumprelu", hook_name="blocks.2.hook_resid_post",
                        apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc[:, 0] = direction
        sae.W_dec[0] = direction
        sae.b_enc[0] = -float((x @ direction).min() + (xc @ direction).max()) / 2  # on for x, off for xc
        sae.threshold[1:] = 1e6
    assert (x @ direction).min() > (xc @ direction).max()
    save(sae, d / "pre" / "blocks.2.hook_resid_post")
    cfg.stages = ["evaluate", "saes"]
    cfg.saes.pretrained = str(d / "pre")
    cfg.saes.train.layers = [2]
    cfg.saes.ce = False
    cfg.saes.eval_seqs = 2
    run(cfg, log=lambda s: None)
    causal = {lab: [[2, 0]] for lab in ev["labels"]}
    return d, view, cfg, causal


CHANGED = "Text: {text}\nThe feeling expressed here is"


def _digest(folder: Path) -> dict[str, str]:
    """Every file under a folder and the sha256 of its bytes."""
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_audit(config, run_dir, view, load_view):
    """The audit of a run directory, through the API (the run's task, SAEs and results)."""
    ctx = RunContext.from_run_dir(run_dir)
    return audit(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.optional("phases"), ctx.optional("trace"), config,
                 load_model=load_view)


def test_identical_candidate_and_planted_breakage(planted_run):
    d, view, _, causal = planted_run
    cands = [Candidate(name="same"), Candidate(name="final_token_changed", template=Template(example=CHANGED))]
    res = run_audit(AuditConfig(candidates=cands, n_boot=200, causal_features=causal), d / "run", view,
                    lambda name=None: load_model(str(view.name)))
    same, changed = res["candidates"]
    # provenance: what the reference weights are, and what each candidate changed
    assert "checkpoint" in res["reference"]["weights"] and res["reference"]["weights"].endswith("run in float32")
    assert same["changed"] == {} and set(changed["changed"]) == {"template"}
    assert same["flip_rate"] == 0 and same["accuracy_change"]["value"] == 0 and same["causal_survival"] == 1.0
    assert all(v["jaccard"] == 1.0 and v["corr"] > 0.999 for v in same["drift"].values()) and not same["failed"]
    # drift is also read against unrelated inputs: zero for the identical candidate, positive for the changed one
    assert all(0 <= v <= 1 for v in res["unrelated_drift"].values()), res["unrelated_drift"]
    assert all(v["normalized"] == 0 for v in same["drift"].values())
    # where unrelated inputs never differ (this tiny model at its answer token) a drift cannot be normalised
    for layer, v in changed["drift"].items():
        if res["unrelated_drift"][layer] == 0 and v["jaccard"] < 1:
            assert v["normalized"] is None
        assert v["normalized"] is None or v["normalized"] >= 0
    assert any(v["normalized"] is None or v["normalized"] > 0 for v in changed["drift"].values())
    assert changed["causal_survival"] < 0.5 and changed["failed"]
    # whether the causal sets still matter: their ablation effect is all there for the identical candidate,
    # gone where the planted feature no longer fires
    assert same["causal_effect"]["value"] == 1.0 and same["causal_effect"]["n"] == 18
    # (zero up to float noise: the ablated and plain passes are batched differently, ~1e-6 on some CPUs)
    assert abs(changed["causal_effect"]["value"]) < 1e-4 and abs(changed["causal_effect"]["hi"]) < 1e-4
    # the effect threshold alone can fail a candidate
    from emoscope.stages.audit import Thresholds
    loose = {"max_accuracy_drop": 1.0, "max_flip_rate": 1.0, "min_causal_survival": 0.0}
    for gate, failed in [(None, []), (0.5, ["final_token_changed"])]:
        t = Thresholds(**loose, min_effect_retained=gate)
        r = run_audit(AuditConfig(candidates=cands[1:], n_boot=100, causal_features=causal, thresholds=t,
                                  ablation_per_emotion=3),
                      d / "run", view, lambda name=None: load_model(str(view.name)))
        assert r["failed"] == failed
    assert res["failed"] == ["final_token_changed"]


def test_audit_rows_carry_llama_perplexitys_figures(planted_run, shared_data):
    """With audit.kld, every candidate that changes the model gets KL-divergence statistics against the reference
    (measured before any candidate changes its weights in place); a prompt-only candidate gets none; the weights are
    restored bit for bit after int4, so int3 after it is measured against the same base."""
    d, view, _, causal = planted_run
    cands = [Candidate(name="int4", precision="int4"), Candidate(name="int3", precision="int3"),
             Candidate(name="paraphrase", template=Template(instruction="Which emotion? {options}."))]
    cfg = AuditConfig(candidates=cands, n_boot=100, causal_features=causal, ablation_per_emotion=2,
                      kld={"chunks": 2, "n_ctx": 32})
    before = {k: v.clone() for k, v in view.model.state_dict().items()}
    res = run_audit(cfg, d / "run", view, None)
    assert all(torch.equal(before[k], v) for k, v in view.model.state_dict().items())
    int4, int3, para = res["candidates"]
    assert para["kld"] is None
    for row in (int4, int3):
        k = row["kld"]
        assert k["n"] == 2 * 15 and k["mean_kld"] > 0 and 0 <= k["same_top_p"] <= 1 and k["rms_dp"] >= 0
        assert k["kld_99"] <= k["max_kld"] and k["median_kld"] <= k["kld_99"]
    assert int3["kld"]["mean_kld"] > int4["kld"]["mean_kld"]  # fewer bits, further from the reference
    plain = run_audit(cfg.model_copy(update={"kld": None}), d / "run", view, None)
    assert all("kld" not in r for r in plain["candidates"])  # off by default: the rows as before


def test_one_verdict_for_the_audit_and_the_canary():
    """Thresholds.verdict names what a build breaks ('labels', 'features'); a measure not taken gates nothing."""
    from emoscope.deployment.reference import Thresholds

    t = Thresholds(max_accuracy_drop=0.05, max_flip_rate=0.2, min_causal_survival=0.5, min_effect_retained=0.5)
    assert t.verdict(0.0, 0.2, 0.5, 0.5) == []  # at every threshold: passes
    assert t.verdict(0.95 - 1.0, 0.1) == []  # a drop of 5 in 100 computed as 0.05000000000000004: at the threshold
    assert t.verdict(-0.06, 0.0) == ["labels"] and t.verdict(0.0, 0.21) == ["labels"]
    assert t.verdict(0.0, 0.0, non_finite=True) == ["labels"]
    assert t.verdict(0.0, 0.0, 0.49) == ["features"] and t.verdict(0.0, 0.0, None, 0.49) == ["features"]
    assert t.verdict(-0.1, 0.5, 0.0, 0.0) == ["labels", "features"]
    assert Thresholds().verdict(0.0, 0.0, 0.9, 0.0) == []  # effect retained not gated by default


@pytest.mark.parametrize("cand, bits", [
    ({"precision": "int8"}, (8, None)), ({"precision": "int4"}, (4, None)), ({"precision": "bfloat16"}, (16, None)),
    ({"precision": "gguf:Q8_0"}, (8, None)), ({"precision": "llama.cpp:Q4_K_M"}, (4, None)),
    ({"precision": "llama.cpp:IQ4_XS"}, (4, None)), ({"precision": "llama.cpp:Q2_K"}, (2, None)),
    ({"precision": "torchao:int8"}, (8, None)), ({"precision": "quanto:float8"}, (8, None)),
    ({"precision": "bnb:nf4"}, (4, None)), ({"kv_cache": "quanto:int2"}, (None, 2)),
    ({"kv_cache": "gguf:Q8_0"}, (None, 8)), ({"runtime": "llama.cpp", "kv_cache": "q4_0"}, (None, 4)),
    ({"template": {"instruction": "Which emotion? {options}."}}, (None, None))])
def test_a_candidates_bits_come_from_its_format_name_in_every_registry(cand, bits):
    """The canary's 8-bit candidates are those whose format says 8 bits, whichever quantizer made it (so a new
    quantizer is not silently missed, as a hand-written list of strings would miss it)."""
    from emoscope.deployment.candidates import Candidate, bits as bits_of

    assert tuple(bits_of(Candidate(name="c", **cand))) == bits


def test_audit_cli_exit_code_and_bad_candidates(planted_run, tmp_path):
    d, view, cfg, causal = planted_run
    raw = {"run_dir": cfg.run_dir, "model": {"name": cfg.model.name}, "stages": ["evaluate", "saes"],
           "evaluate": cfg.evaluate.model_dump(mode="json"),
           "saes": cfg.saes.model_dump(mode="json"),
           "audit": {"candidates": [{"name": "same"}, {"name": "the_same_build_under_a_long_name_for_ci_logs"}],
                     "n_boot": 100, "causal_features": causal}}
    f = tmp_path / "audit.yaml"
    f.write_text(yaml.safe_dump(raw))
    r = cli("audit", "--config", f)  # stdout piped: rich's 80 columns; every name and verdict whole
    assert r.returncode == 0, r.stderr
    assert "the_same_build_under_a_long_name_for_ci_logs  [verdict: ok]" in r.stdout, r.stdout
    assert "same  [verdict: ok]" in r.stdout and "    flip rate: 0.00" in r.stdout
    assert "…" not in r.stdout  # nothing cut
    raw["audit"]["candidates"] = [{"name": "changed", "template": {"example": CHANGED}}]  # silences the feature
    f.write_text(yaml.safe_dump(raw))
    r = cli("audit", "--config", f)
    assert r.returncode == 1 and "audit failed: changed" in r.stderr
    # a gate that cannot fail (a share above 1) is refused before anything runs: the run directory is untouched
    before = _digest(Path(cfg.run_dir))
    raw["audit"]["thresholds"] = {"max_flip_rate": 1.5}
    f.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("audit", "--config", f), "audit.thresholds.max_flip_rate")
    raw["audit"]["thresholds"] = {}
    raw["audit"]["candidates"] = [{"name": "same"}, {"name": "same", "precision": "int8"}]
    f.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("audit", "--config", f), "'same' twice")
    assert _digest(Path(cfg.run_dir)) == before
    raw["audit"]["candidates"] = [{"name": "q", "precision": "int5"}]
    f.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("audit", "--config", f), "precision")
    raw["audit"]["candidates"] = [{"name": "t", "template": {"example": "no placeholder"}}]
    f.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("audit", "--config", f), "{text} placeholder")


def test_other_tokenizer_is_refused(planted_run, tmp_path):
    d, view, _, _ = planted_run
    from tiny import save_tiny, tiny_model, tiny_tokenizer
    other = tiny_model("llama")
    other.tokenizer = tiny_tokenizer(vocab_size=300)
    save_tiny(other, tmp_path / "other")
    with pytest.raises(EmoscopeError, match="another tokenizer"):
        run_audit(AuditConfig(candidates=[Candidate(name="x", model=str(tmp_path / "other"))], n_boot=100),
                  d / "run", view,
                  lambda name=None: load_model(name or str(view.name)))


def test_a_second_model_file_is_a_candidate(planted_run, tmp_path):
    """The file a team ships (here the same tiny model saved again, in bfloat16) audited against the reference,
    with what its weights are named in the result."""
    d, view, _, causal = planted_run
    from tiny import save_tiny
    shipped = load_model(str(view.name), dtype="bfloat16")
    shipped.model.to(torch.bfloat16)
    save_tiny(shipped, tmp_path / "shipped")
    res = run_audit(AuditConfig(candidates=[Candidate(name="shipped", model=str(tmp_path / "shipped"))], n_boot=100,
                                causal_features=causal, ablation_per_emotion=2),
                    d / "run", view, lambda name=None: load_model(name, dtype="float32"))
    row = res["candidates"][0]
    assert row["changed"] == {"model": str(tmp_path / "shipped")}, row["changed"]
    assert row["weights"].startswith("bfloat16 checkpoint"), row["weights"]
    assert 0 <= row["flip_rate"] <= 1 and row["causal_effect"] is not None


def test_candidate_with_non_finite_outputs_is_failed_not_crashed(planted_run):
    """Gemma-3 in float16 overflows to NaN on a CPU; such a candidate must be reported, not crash the audit."""
    d, view, _, causal = planted_run

    def broken(name=None):
        v = load_model(str(view.name))
        with torch.no_grad():
            v.blocks[1].mlp.down_proj.weight.fill_(float("nan"))
        return v

    res = run_audit(AuditConfig(candidates=[Candidate(name="nan", model=str(view.name))], n_boot=100,
                                causal_features=causal),
                    d / "run", view, broken)
    c = res["candidates"][0]
    assert c["non_finite_frac"] == 1.0 and c["accuracy"] == 0.0 and c["failed"] and res["failed"] == ["nan"]


def test_phase_drift_is_a_ratio_of_sums_with_an_interval():
    """A layer where unrelated inputs barely differ must not dominate its phase (a mean of per-layer
    ratios would give phase 1 a drift of 2.75 here); the final phase's excess carries an interval."""
    from emoscope.analysis.drift import phase_drift as _phase_drift
    rng = np.random.default_rng(0)
    n = 200
    per_ex = {0: rng.uniform(0.3, 0.5, n), 1: rng.uniform(0.3, 0.5, n),  # phase 0: drifts 0.4 of 0.5
              2: rng.uniform(0.04, 0.06, n), 3: rng.uniform(0.2, 0.4, n)}  # phase 1: 0.05 of 0.01, 0.3 of 0.6
    unrelated = {0: 0.5, 1: 0.5, 2: 0.01, 3: 0.6}
    phase = {0: 0, 1: 0, 2: 1, 3: 1}
    boots = rng.integers(0, n, (500, n))
    by_phase, excess = _phase_drift(per_ex, unrelated, phase, 2, boots)
    assert abs(by_phase[0] - 0.8) < 0.02 and abs(by_phase[1] - 0.35 / 0.61) < 0.02
    assert excess["lo"] <= excess["value"] <= excess["hi"] < 0  # phase 0 drifts more, and the interval says so
    same = {layer: np.zeros(n) for layer in per_ex}
    by_phase, excess = _phase_drift(same, unrelated, phase, 2, boots)
    assert by_phase == {0: 0.0, 1: 0.0} and excess == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    # undefined normalisation (unrelated inputs never differ, the candidate does): no phase value, no excess
    by_phase, excess = _phase_drift(per_ex, {0: 0.0, 1: 0.0, 2: 0.01, 3: 0.6}, phase, 2, boots)
    assert by_phase[0] is None and excess is None
    # one phase: nothing to compare with
    assert _phase_drift(per_ex, unrelated, {layer: 0 for layer in per_ex}, 1, boots)[1] is None


def test_library_kernels_are_candidates(planted_run):
    """torchao and optimum-quanto quantize the reference's weights on load and their kernels run (on this
    CPU: torchao int8 / intx-int4, quanto int8 / int4); the result names the library, its version and the
    tensor types the weights became; an int4 candidate drifts where a float32 one does not; bitsandbytes
    off CUDA and a model file combined with a library precision are one-line errors."""
    pytest.importorskip("torchao")
    pytest.importorskip("optimum.quanto")
    import importlib.metadata as md

    d, view, _, causal = planted_run
    cands = [Candidate(name="same", precision="float32"), Candidate(name="ao8", precision="torchao:int8"),
             Candidate(name="ao4", precision="torchao:int4"), Candidate(name="q4", precision="quanto:int4")]
    res = run_audit(AuditConfig(candidates=cands, n_boot=100, causal_features=causal, ablation_per_emotion=2),
                    d / "run", view, None)
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["ao8"]["library"] == f"torchao {md.version('torchao')}" and rows["ao8"]["kernels"] == ["Int8Tensor"]
    assert rows["ao4"]["kernels"] == ["IntxUnpackedToInt8Tensor"]  # torchao's CPU int4 path
    assert rows["q4"]["library"] == f"optimum-quanto {md.version('optimum-quanto')}"
    assert "WeightQBitsTensor" in rows["q4"]["kernels"]
    assert "quantized on load by optimum-quanto" in rows["q4"]["weights"]
    assert rows["ao4"]["changed"] == {"precision": "torchao:int4"}
    assert all(v["jaccard"] == 1.0 for v in rows["same"]["drift"].values())
    # the int4 weights really run: the same model loaded with quanto int4 gives other logits
    from emoscope.models import ModelConfig
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    q4 = load_model(ModelConfig(name=str(view.name), quantization="quanto:int4"))
    with torch.no_grad():
        assert (q4.model(ids).logits - view.model(ids).logits).abs().max() > 1e-3
    with pytest.raises(EmoscopeError, match="bitsandbytes"):
        run_audit(AuditConfig(candidates=[Candidate(name="nf4", precision="bnb:nf4")], ablation_per_emotion=0),
                  d / "run", view, None)
    with pytest.raises(EmoscopeError, match="not both"):
        run_audit(AuditConfig(candidates=[Candidate(name="x", precision="quanto:int8", model=str(view.name))],
                              ablation_per_emotion=0), d / "run", view, None)


def test_a_quantized_kv_cache_is_a_candidate(planted_run):
    """A KV cache candidate runs the reference's weights with every attention reading quantized keys and
    values; the row names the scheme and its library; the model's attention is restored after it; a
    llama.cpp cache type that does not fit the head dimension is a one-line error."""
    pytest.importorskip("optimum.quanto")
    d, view, _, causal = planted_run
    cands = [Candidate(name="kv4", kv_cache="quanto:int4"), Candidate(name="kv2", kv_cache="quanto:int2")]
    res = run_audit(AuditConfig(candidates=cands, n_boot=100, causal_features=causal, ablation_per_emotion=2),
                    d / "run", view, None)
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["kv4"]["changed"] == {"kv_cache": "quanto:int4"} and rows["kv4"]["kv_group_size"] == 8
    assert rows["kv2"]["kv_library"].startswith("optimum-quanto ")
    assert rows["kv2"]["flip_rate"] > 0 and rows["kv2"]["causal_effect"]["value"] != 1.0  # the cache's error matters
    assert view.model.config._attn_implementation == "sdpa"
    with pytest.raises(EmoscopeError, match="block of 32"):
        run_audit(AuditConfig(candidates=[Candidate(name="q8", kv_cache="gguf:Q8_0")], ablation_per_emotion=0),
                  d / "run", view, None)


def test_causal_features_fall_back_to_features_beating_the_random_control():
    from emoscope.deployment.reference import traced as _traced

    feat = lambda layer, f, lo: {"layer": layer, "feature": f, "effect": {"value": lo + 0.1, "lo": lo, "hi": lo + 0.2}}
    phases = {"0": {"set": [], "features": [feat(1, 5, 0.3), feat(1, 6, 0.05)], "random_control": {"hi": 0.1}},
              "1": {"set": [], "features": [feat(3, 7, 1.2)], "random_control": {"hi": 0.2}}}
    assert _traced({"phases": phases}) == [[1, 5], [3, 7]]  # 1/6's interval reaches into the control's
    phases["1"]["set"] = [[3, 7]]
    assert _traced({"phases": phases}) == [[3, 7]]  # a chosen set wins whenever there is one


def test_refused_commands_leave_the_run_directory_byte_identical(planted_run, tmp_path, monkeypatch):
    """canary write, canary check, sensitivity and classify check their own inputs (output path, upstream stages,
    the canary's contents, texts) before resuming a pipeline or opening anything for writing."""
    import shutil

    d, view, cfg, causal = planted_run
    run_dir = Path(cfg.run_dir)
    raw = {"run_dir": cfg.run_dir, "model": {"name": cfg.model.name}, "stages": ["evaluate", "saes"],
           "evaluate": cfg.evaluate.model_dump(mode="json"), "saes": cfg.saes.model_dump(mode="json"),
           "audit": {"candidates": [{"name": "same"}], "n_boot": 100, "causal_features": causal}}
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(raw))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    long_text = tmp_path / "long.txt"
    long_text.write_text("word " * 5000 + "\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "I am so happy"}\n{"text": "   "}\n')
    empty_canary = tmp_path / "empty_canary"
    empty_canary.mkdir()
    before = _digest(run_dir)
    refused = [
        (("canary", "write", "--config", f, "--out", a_file), "a file is there"),
        (("canary", "write", "--config", f, "--out", crowded), "holds other files"),
        (("canary", "write", "--config", f, "--n", 0), "canary.n"),
        (("canary", "write", "--config", f, "--set", "canary.n=2"), "canary.n"),
        (("sensitivity", "--config", f), "has no audit stage"),
        (("sensitivity", "--config", f, "--set", "sensitivity.group_size=0"), "sensitivity.group_size"),
        (("classify", "--run", run_dir, ""), "text 1 of 1 is empty"),
        (("classify", "--run", run_dir), "no texts"),
        (("classify", "--run", run_dir, "--file", texts), "text 2 of 2 is empty"),
        (("classify", "--run", run_dir, "--file", long_text, "--max-tokens", 100), "over --max-tokens 100"),
        (("classify", "--run", run_dir, "--file", tmp_path / "none.txt"), "cannot read it"),
    ]
    for args, msg in refused:
        _one_line_error(cli(*args), msg)
        assert _digest(run_dir) == before, args
    assert (crowded / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"
    # a canary with no examples is refused on load, not deep inside a check
    r = cli("canary", "write", "--config", f, "--out", tmp_path / "canary")
    assert r.returncode == 0, r.stderr
    shutil.copy(tmp_path / "canary" / "canary.safetensors", empty_canary)
    meta = json.loads((tmp_path / "canary" / "canary.json").read_text())
    meta.update(texts=[], gold=[], prompts=[], ref_pred=[])
    (empty_canary / "canary.json").write_text(json.dumps(meta))
    after = _digest(run_dir)
    _one_line_error(cli("canary", "check", empty_canary, "--model", cfg.model.name), "nothing to check")
    renamed = tmp_path / "renamed_canary"  # label names that its label tokens do not spell: blamed, not the tokenizer
    shutil.copytree(tmp_path / "canary", renamed)
    meta = json.loads((renamed / "canary.json").read_text())
    meta.update(labels=[lab.upper() for lab in meta["labels"]], gold=[g.upper() for g in meta["gold"]])
    (renamed / "canary.json").write_text(json.dumps(meta))
    _one_line_error(cli("canary", "check", renamed, "--model", cfg.model.name), "the canary's labels (ANGER")
    assert _digest(run_dir) == after
    # texts from a file and stdin are classified as arguments are
    ok = tmp_path / "ok.txt"
    ok.write_text("I am so happy\n\nThat is disgusting\n")
    r = cli("classify", "--run", run_dir, "--file", ok, "--json")
    assert r.returncode == 0, r.stderr
    assert [row["text"] for row in json.loads(r.stdout)] == ["I am so happy", "That is disgusting"]
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "I am so happy"}\n{"text": "That is disgusting"}\n'))
    r = cli("classify", "--run", run_dir, "--file", "-", "--json")
    assert [row["text"] for row in json.loads(r.stdout)] == ["I am so happy", "That is disgusting"]


BAD = {"--n": ["0", "-3", "1e9", "", "abc"], "--threads": ["0", "-1", "100000", ""], "--group-size": ["0", "-2", ""],
       "--target": ["", "Q9_K", "F32"], "--high": ["", "int4"], "--max-tokens": ["0", "-5", ""],
       "--set": ["canary.n=1", "canary.kappa=-1", "canary.confidence=1.5", "sensitivity.group_size=0",
                 "sensitivity.threads=0", "sensitivity.target=''", "audit.thresholds.max_flip_rate=2"],
       "--out": ["FILE", "CROWDED"], "--file": ["MISSING", "EMPTY_TEXT"], "--kv-cache": ["", "q9"],
       "--runtime": ["", "vllm"], "--model": ["", "MISSING.gguf"]}
SURFACES = {("canary", "write"): ["--n", "--set", "--out"],
            ("sensitivity",): ["--threads", "--group-size", "--target", "--high", "--set"],
            ("classify",): ["--max-tokens", "--file"],
            ("canary", "check"): ["--threads", "--kv-cache", "--runtime", "--model"]}


def test_the_newest_commands_refuse_bad_values_without_touching_the_run(planted_run, tmp_path_factory):
    """Property test: each of canary write/check, sensitivity and classify, driven with out-of-range, empty and
    degenerate values (drawn by hypothesis), exits 2 with one `error:` line and leaves the run directory as it was."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    d, view, cfg, causal = planted_run
    run_dir, root = Path(cfg.run_dir), tmp_path_factory.mktemp("bad")
    raw = {"run_dir": cfg.run_dir, "model": {"name": cfg.model.name}, "stages": ["evaluate", "saes", "audit"],
           "evaluate": cfg.evaluate.model_dump(mode="json"), "saes": cfg.saes.model_dump(mode="json"),
           "audit": {"candidates": [{"name": "same"}], "n_boot": 100, "causal_features": causal}}
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    (root / "FILE").write_text("x")
    (root / "CROWDED").mkdir()
    (root / "CROWDED" / "mine.txt").write_text("x")
    (root / "EMPTY_TEXT").write_text('{"text": "fine"}\n{"text": ""}\n')
    assert cli("canary", "write", "--config", root / "run.yaml", "--out", root / "canary").returncode == 0
    before = _digest(run_dir)
    surface = st.sampled_from(sorted(SURFACES))

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(surface.flatmap(lambda s: st.tuples(st.just(s), st.lists(
        st.sampled_from(SURFACES[s]).flatmap(lambda o: st.tuples(st.just(o), st.sampled_from(BAD[o]))),
        min_size=1, max_size=3))))
    def drive(case):
        refused(*case)

    def refused(command, opts):
        argv = list(command)
        argv += {"canary write": ["--config", root / "run.yaml"], "sensitivity": ["--config", root / "run.yaml"],
                 "classify": ["--run", run_dir], "canary check": [root / "canary"]}[" ".join(command)]
        for opt, value in opts:
            argv += [opt, str(root / value) if value in ("FILE", "CROWDED", "MISSING", "EMPTY_TEXT") else value]
        if command == ("canary", "check") and "--model" not in argv:
            argv += ["--model", cfg.model.name]
        r = cli(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, (argv, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert "Usage:" in r.stderr or [line.startswith("error:") for line in lines] == [True], (argv, r.stderr)
        assert _digest(run_dir) == before, argv

    for command, options in SURFACES.items():  # every value alone, then hypothesis's combinations
        for opt in options:
            for value in BAD[opt]:
                refused(command, [(opt, value)])
    drive()
