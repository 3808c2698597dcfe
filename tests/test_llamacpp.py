"""The llama.cpp backend against the PyTorch reference on the same token ids: label scores, residuals read through
the eval callback, SAE ablations written into llama.cpp's graph; its files (F32 GGUF, llama.cpp's quantizer with
per-tensor overrides); the audit's llama.cpp rows; errors (callback exceptions, tokenizer mismatches, no extra)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.models import load_model
from emoscope.sae import SAE, SAEConfig
from test_cli import _one_line_error, cli

LABELS = [" anger", " disgust", " fear", " joy", " sadness", " surprise", " utterly astonished"]  # the last: 3 tokens
TEXTS = ["I am so happy today!", "This is disgusting.", "Why would you do that to me?", "Oh wow", "I miss her.",
         "Leave me alone, you liar!"]


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):  # make test installs the extra: on CI its absence is a failure, not a skip
            pytest.fail("llama-cpp-python is not installed (make test installs emoscope[llamacpp])")
        pytest.skip("llama-cpp-python is not installed")
    return llama_cpp


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, llama_cpp):
    from tiny import tiny_gguf
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def both(gguf_file):
    """The tiny GGUF dequantised into PyTorch (the reference) and run by llama.cpp, with prompts and labels."""
    ref = load_model(str(gguf_file))
    lm = load_model(str(gguf_file), backend="llama.cpp", threads=2)
    tok = ref.tokenizer
    prompts = [tok("Classify the emotion of the text. Text: " + t + " Emotion:").input_ids for t in TEXTS]
    labels = [tok(s, add_special_tokens=False).input_ids for s in LABELS]
    assert max(len(lab) for lab in labels) > 1 and min(len(lab) for lab in labels) == 1
    return ref, lm, prompts, labels


def _saes(ref, prompts, seed=0):
    """Random SAEs on both layers whose active features on these prompts are known."""
    torch.manual_seed(seed)
    saes = {}
    for layer in range(ref.n_layers):
        sae = SAE(SAEConfig(d_in=ref.d_model, d_sae=256, k=16, hook_name=f"blocks.{layer}.hook_resid_post"))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.2)
        saes[layer] = sae
    return saes


def test_scores_and_residuals_match_pytorch_on_the_same_ids(both):
    ref, lm, prompts, labels = both
    layers = list(range(ref.n_layers))
    a, ra = ref.score_ids(prompts, labels, resid_layers=layers)
    b, rb = lm.score_ids(prompts, labels, resid_layers=layers)
    # llama.cpp's own arithmetic (f16 KV cache, its kernels): measured 0.007 nats, 5e-4 relative here
    assert np.abs(a - b).max() < 0.03, np.abs(a - b).max()
    for layer in layers:
        rel = np.linalg.norm(ra[layer] - rb[layer]) / np.linalg.norm(ra[layer])
        assert rel < 3e-3, (layer, rel)
    # a wrong answer position (the token before it) is far off: the comparison can fail
    shifted = ref.score_ids([p[:-1] for p in prompts], labels, resid_layers=layers)[1]
    assert np.linalg.norm(shifted[0] - rb[0]) / np.linalg.norm(rb[0]) > 0.1
    # scoring one prompt at a time gives the same numbers (sequences do not see each other)
    one = np.concatenate([lm.score_ids([p], labels) for p in prompts])
    assert np.abs(one - b).max() < 1e-3


def test_ablations_inside_llamacpp_match_pytorch(both):
    ref, lm, prompts, labels = both
    saes = _saes(ref, prompts)
    res = ref.score_ids(prompts, labels, resid_layers=[0, 1])[1]
    active = {layer: np.flatnonzero((saes[layer].encode(torch.from_numpy(res[layer])) > 0).any(0).numpy())
              for layer in (0, 1)}
    tokens, gold = [lab[0] for lab in labels[:6]], np.array([3, 1, 0, 5, 4, 0])
    sets = [{}, {0: active[0][:5].tolist()}, {1: active[1][:20].tolist()}, {0: active[0][5:9].tolist(),
                                                                              1: active[1][20:24].tolist()}]
    ma = ref.ablate_each(saes, prompts, gold, tokens, sets)
    mb = lm.ablate_each(saes, prompts, gold, tokens, sets)
    assert np.abs(ma - mb).max() < 0.02, np.abs(ma - mb).max()
    effect = np.abs(mb[1:] - mb[0]).max(1)
    assert (effect > 0.05).all(), effect  # every set changed the margins: the edits reached the graph
    assert np.allclose(lm.ablate_each(saes, prompts, gold, tokens, [sets[2]])[0], mb[2], atol=1e-4)  # one set alone


def test_qwen2_runs_alike_in_both_runtimes_with_its_chat_template(tmp_path, llama_cpp):
    """A Qwen2 GGUF (attention biases; Qwen's chat template and its default system prompt): transformers loads it as
    Qwen2, the chat prompt carries the default system turn and ends where the answer starts, every label starts with
    its own token, llama.cpp tokenizes the prompts alike, and its scores and residuals match PyTorch's."""
    from emoscope.hooks import HookPoint, record
    from emoscope.task.prompts import PromptBuilder, Template
    from tiny import tiny_gguf

    path = tiny_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2", n_layers=3)
    ref = load_model(str(path))
    lm = load_model(str(path), backend="llama.cpp", threads=2)
    assert type(ref.model).__name__ == "Qwen2ForCausalLM" and ref.chat and lm.chat
    assert ref.model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the biases arrived
    classes = [s.strip() for s in LABELS[:6]]
    pb = PromptBuilder(ref.tokenizer, Template(), classes, [], True, ref.max_context)
    prompt = pb.prompt(TEXTS[0])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert prompt.endswith("<|im_start|>assistant\n") and TEXTS[0] in prompt
    label_ids = pb.label_ids()
    assert len({ids[0] for ids in label_ids}) == len(classes)
    ids = [pb.encode(pb.prompt(t)) for t in TEXTS]
    lm.check_tokens([pb.prompt(t) for t in TEXTS], ids, pb.label_strings(), label_ids)
    a, ra = ref.score_ids(ids, label_ids, resid_layers=[0, 2])
    b, rb = lm.score_ids(ids, label_ids, resid_layers=[0, 2])
    assert np.abs(a - b).max() < 0.03, np.abs(a - b).max()
    for layer in (0, 2):
        assert np.linalg.norm(ra[layer] - rb[layer]) / np.linalg.norm(ra[layer]) < 3e-3
    with torch.no_grad(), record(ref, [HookPoint(1, "mlp_out"), HookPoint(1, "attn_out")]) as acts:
        ref.model(input_ids=torch.tensor([ids[0]]))
    assert acts["blocks.1.hook_mlp_out"].shape == acts["blocks.1.hook_attn_out"].shape == (1, len(ids[0]), 64)


def test_callback_exception_is_raised_after_the_decode_and_the_model_stays_usable(both):
    ref, lm, prompts, labels = both
    before = lm.score_ids(prompts, labels)

    def broken(x, rows):
        raise RuntimeError("edit failed")
    with pytest.raises(RuntimeError, match="edit failed"):
        lm.answer_logits_each(prompts, [9846], 1, {0: broken})
    assert np.abs(lm.score_ids(prompts, labels) - before).max() < 1e-5


def test_tokenizer_disagreement_is_a_clear_error(both):
    ref, lm, prompts, labels = both
    texts = [ref.tokenizer.decode(p) for p in prompts]
    lm.check_tokens(texts, prompts, LABELS, labels)  # the GGUF's tokenizer agrees with transformers' here
    wrong = [list(prompts[0])] + prompts[1:]
    wrong[0][3] += 1
    with pytest.raises(EmoscopeError, match="tokenizes a prompt differently"):
        lm.check_tokens(texts, wrong, LABELS, labels)
    with pytest.raises(EmoscopeError, match="label"):
        lm.check_tokens(texts, prompts, LABELS, [labels[1]] + labels[1:])


def test_float_gguf_and_llamacpp_quantizer_with_overrides(gguf_file, tmp_path, monkeypatch):
    import gguf

    from emoscope.backends import gguf_build as llamacpp

    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path))
    f32 = llamacpp.write_float_gguf(gguf_file)
    src, out = gguf.GGUFReader(gguf_file), gguf.GGUFReader(f32)
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(src.tensors, out.tensors))
    q = llamacpp.quantize(f32, "Q4_0", overrides={r"blk\.0\.ffn_down": "q8_0"})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert q.stat().st_size < f32.stat().st_size / 2  # the tied embedding stays at Q6_K, as llama.cpp does
    assert llamacpp.quantize(f32, "Q4_0", overrides={r"blk\.0\.ffn_down": "q8_0"}) == q  # cached by content
    with pytest.raises(EmoscopeError, match="unknown llama.cpp type"):
        llamacpp.quantize(f32, "Q9_K")


def test_audit_has_llamacpp_rows_beside_their_parity(both, toy_data):
    import emoscope as es
    from emoscope.deployment.candidates import PARITY
    from emoscope.stages.audit import audit

    ref, lm, prompts, _ = both
    task = es.Task(ref, dataset=str(toy_data), per_class=4)
    ev = es.evaluate(task)
    saes = _saes(ref, prompts)
    res = ref.score_ids(task.encode_all(list(ev.predictions.text)), task.label_ids, resid_layers=[1])[1]
    on = (saes[1].encode(torch.from_numpy(res[1])) > 0).float().mean(0).numpy()
    causal = {lab: [[1, int(f)] for f in np.argsort(-on)[3 * i:3 * i + 3]] for i, lab in enumerate(ev["labels"])}
    hooks = {f"blocks.{layer}.hook_resid_post": s for layer, s in saes.items()}
    cands = [{"name": "q8", "precision": "llama.cpp:Q8_0", "threads": 1}, {"name": "q2", "precision": "llama.cpp:Q2_K"},
             {"name": "kv4", "runtime": "llama.cpp", "kv_cache": "q4_0"},
             {"name": "shipped", "runtime": "llama.cpp", "model": "source"},
             {"name": "q2_emulated", "precision": "llama.cpp:Q2_K", "runtime": "transformers"}]
    out = audit(task, hooks, ev, None, None, {"candidates": cands, "causal_features": causal, "n_boot": 200,
                                             "ablation_per_emotion": 4, "kld": {"chunks": 2, "n_ctx": 32}})
    rows = {r["name"]: r for r in out.data["candidates"]}
    assert list(rows) == [PARITY, "q8", "q2", "kv4", "shipped", "q2_emulated"]
    par = rows[PARITY]
    assert par["flip_rate"] <= 0.05 and par["label_logp_max_change"] < 0.05 and par["causal_survival"] > 0.95
    assert abs(par["causal_effect"]["value"] - 1) < 0.05  # the ablation's effect measured in llama.cpp is the same
    for name in ("q8", "q2", "kv4", "shipped"):
        r = rows[name]
        assert r["runtime"].startswith("llama-cpp-python") and r["parity"]["candidate"] == PARITY
        assert r["file_bytes"] > 0
    assert rows["q8"]["file_type"] == "Q8_0" and rows["q8"]["threads"] == 1 and rows["kv4"]["kv_cache"] == "q4_0"
    assert rows["q2"]["file_bytes"] < rows["q8"]["file_bytes"] < rows[PARITY]["file_bytes"]
    assert rows["q2"]["label_logp_max_change"] > rows["q8"]["label_logp_max_change"]  # 2 bits move more than 8
    assert "runtime" not in rows["q2_emulated"] and "dequantised" in rows["q2_emulated"]["weights"]
    # llama-perplexity's figures: llama.cpp rows against the F32 GGUF in llama.cpp (the parity row is that base), the
    # emulated row against the PyTorch reference; 2 bits diverge more than 8, in either runtime
    assert rows[PARITY]["kld"] is None and all(rows[n]["kld"]["n"] == 30 for n in ("q8", "q2", "kv4", "q2_emulated"))
    assert rows["q8"]["kld"]["mean_kld"] < rows["q2"]["kld"]["mean_kld"]
    assert rows["q8"]["kld"]["mean_kld"] < rows["q2_emulated"]["kld"]["mean_kld"]


@pytest.mark.parametrize("cand, msg", [
    ({"name": "x", "precision": "llama.cpp:Q9"}, "unknown llama.cpp type"),
    ({"name": "x", "runtime": "llama.cpp", "kv_cache": "gguf:Q8_0"}, "choose f16, q8_0, q4_0"),
    ({"name": "x", "runtime": "llama.cpp", "precision": "int4"}, "takes a precision llama.cpp:TYPE"),
    ({"name": "x", "threads": 2}, "threads is a setting of runtime llama.cpp"),
    ({"name": "x", "runtime": "llama.cpp", "model": "some/folder"}, "a llama.cpp model is a .gguf file"),
])
def test_bad_llamacpp_candidates_are_refused(cand, msg):
    from emoscope.errors import validated
    from emoscope.stages.audit import AuditConfig

    with pytest.raises(EmoscopeError, match=msg):
        validated(AuditConfig, {"candidates": [cand]})


def test_backend_settings_are_checked():
    from emoscope.config import RunConfig
    from emoscope.errors import validated

    with pytest.raises(EmoscopeError, match="settings of backend: llama.cpp"):
        load_model("x.gguf", backend="transformers", kv_cache="q8_0")
    with pytest.raises(EmoscopeError, match="needs a GGUF file"):
        load_model("some/hub-id", backend="llama.cpp")
    with pytest.raises(EmoscopeError, match="stages saes read and edit the model in PyTorch"):
        validated(RunConfig, {"model": {"name": "gemma3-270m", "backend": "llama.cpp"}, "stages": ["evaluate", "saes"]})


def test_without_the_extra_a_llamacpp_candidate_is_one_line_naming_the_install(tmp_path, gguf_file, toy_data):
    blocked = tmp_path / "blocked" / "llama_cpp"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "emoscope.cli", "evaluate", "--model", str(gguf_file), "--backend",
                        "llama.cpp", "--dataset", str(toy_data), "--per-class", "2"], capture_output=True, text=True,
                       env=env)
    _one_line_error(r, "pip install 'emoscope[llamacpp]'")


def test_evaluate_runs_on_llamacpp_from_the_cli(gguf_file, toy_data, tmp_path):
    import json

    import pandas as pd

    base = ["evaluate", "--model", gguf_file, "--dataset", toy_data, "--per-class", 3, "--json"]
    a = json.loads(cli(*base, "--out", tmp_path / "t").stdout)
    b = json.loads(cli(*base, "--backend", "llama.cpp", "--threads", 2, "--out", tmp_path / "l").stdout)
    assert a["n"] == b["n"] == 18 and b["model"]["backend"] == "llama.cpp"
    pa, pb = (pd.read_parquet(tmp_path / d / "evaluate" / "predictions.parquet") for d in ("t", "l"))
    cols = [f"logp_{lab}" for lab in a["labels"]]
    assert list(pa.text) == list(pb.text)
    assert np.abs(pa[cols].to_numpy() - pb[cols].to_numpy()).max() < 0.03  # nats, as the scoring test


def test_recipe_search_finds_the_planted_optimum():
    from hypothesis import given, settings, strategies as st

    from emoscope.analysis.recipe import brute_force, cheapest

    # planted: layers 5 and 6 carry the damage; keeping both is the only way under the threshold, and layer 0 is a
    # cheap decoy with a small gain
    gain, cost = [2, 0, 0, 0, 1, 12, 10, 0], [1, 5, 5, 5, 5, 8, 9, 5]
    r = cheapest(40, gain, cost, 20)
    assert r.keep == [5, 6] and r.predicted_flips == 18 and r.added_bytes == 17 and r.feasible
    assert cheapest(40, gain, cost, 40).keep == [] and not cheapest(40, gain, cost, 10).feasible

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(-3, 8), st.integers(1, 50)), min_size=1, max_size=9), st.integers(0, 30),
           st.integers(0, 30))
    def same_as_brute_force(items, base, allowed):
        gain, cost = [g for g, _ in items], [c for _, c in items]
        r, best = cheapest(base, gain, cost, allowed), brute_force(base, gain, cost, allowed)
        assert r.feasible == (best is not None)
        if best is not None:
            assert r.added_bytes == best[0] and base - sum(gain[i] for i in r.keep) <= allowed
    same_as_brute_force()


def _evaluated(both, toy_data):
    """The toy task on the GGUF reference, evaluated, with random SAEs and one causal feature per emotion."""
    import emoscope as es
    ref, _, prompts, _ = both
    task = es.Task(ref, dataset=str(toy_data), per_class=4)
    ev = es.evaluate(task)
    hooks = {f"blocks.{layer}.hook_resid_post": s for layer, s in _saes(ref, prompts).items()}
    return task, ev, hooks, {lab: [[1, 3 * i]] for i, lab in enumerate(ev["labels"])}


def test_recipe_reads_spread_damage_from_the_forward_rows():
    from emoscope.stages.audit import AuditConfig
    from emoscope.stages.sensitivity import SensitivityConfig, _recipe

    # planted, n = 100, threshold 0.2: four layers each add 10 flips alone at Q2_K (uniform Q2_K: 40, uniform Q8_0:
    # 2), but keeping one high among the others at Q2_K saves only 2 (their damage interacts): the reverse rows
    # cannot reach 20, the forward rows say keep three (2 + 10 = 12), the cheapest three (layer 3 costs more)
    n, groups = 100, [(str(i), [f"blk.{i}.w"]) for i in range(4)]
    row = lambda flips, size: {"flip_rate": flips / n, "file_bytes": size}
    rows = {"uniform_Q2_K": row(40, 1000), "uniform_Q8_0": row(2, 2000), "llama.cpp_F32": row(0, 4000),
            **{f"only_{i}": row(10, 3800) for i in range(4)},
            **{f"keep_{i}": row(38, 1250 + 100 * (i == 3)) for i in range(4)}}
    types = ({f"blk.{i}.w": "Q2_K" for i in range(4)}, {f"blk.{i}.w": "Q8_0" for i in range(4)})
    cfg, acfg = SensitivityConfig(target="Q2_K"), AuditConfig(thresholds={"max_flip_rate": 0.2})
    rec = _recipe(groups, rows, *types, cfg, acfg, n)
    assert rec["model"] == "forward" and rec["feasible"] and rec["keep_high"] == ["0", "1", "2"]
    assert rec["predicted_flip_rate"] == pytest.approx(0.12) and rec["predicted_file_bytes"] == 1750
    assert rec["by_model"]["reverse"] == {"keep_high": ["0", "1", "2", "3"], "feasible": False,
                                          "predicted_flip_rate": 0.32, "predicted_file_bytes": 2100}
    assert rec["types"]["blk.3.w"] == "Q2_K" and rec["llama_quantize_overrides"][0] == "blk.0.w=q8_0"


def test_sensitivity_rows_recipe_and_plot(both, toy_data, tmp_path, monkeypatch):
    from emoscope.deployment.reference import Reference
    from emoscope.report import sensitivity as plot
    from emoscope.stages.sensitivity import sensitivity

    from emoscope.backends import gguf_build

    task, ev, hooks, causal = _evaluated(both, toy_data)
    measured, built, present = [], [], []
    real = Reference.measure.__func__
    counted = classmethod(lambda cls, *a, **k: measured.append(1) or real(cls, *a, **k))
    monkeypatch.setattr(Reference, "measure", counted)
    real_build = gguf_build.build

    def build(*a, **k):  # how many group files exist whenever one is built
        built.append(real_build(*a, **k))
        present.append(len({p for p in built if p.exists()}))
        return built[-1]
    monkeypatch.setattr(gguf_build, "build", build)
    res = sensitivity(task, hooks, ev, None, None, {"target": "Q4_0", "n_perm": 200},
                      {"causal_features": causal, "n_boot": 200, "ablation_per_emotion": 2,
                       "thresholds": {"max_flip_rate": 0.5}})
    # six group files, each built when its turn comes and removed once audited; the recipe's file (which may be one
    # of them again) and the uniform files stay
    assert len(built) == 7 and present == [1] * 7
    assert [p.exists() for p in built[:6]] == [p == built[6] for p in built[:6]] and built[6].exists()
    assert all(gguf_build.quantize(gguf_build.write_float_gguf(both[1].path), t).exists() for t in ("Q4_0", "Q8_0"))
    frame = res.to_frame()
    assert list(frame.group) == ["0", "0", "1", "1", "embeddings", "embeddings"]
    assert set(frame.direction) == {"only", "keep"} and (frame.file_bytes > 0).all()
    rec = res.recipe
    # whatever is kept, the built file has exactly the recipe's types and its audit is reported beside the prediction
    assert rec["measured"]["file_bytes"] > 0 and 0 <= rec["predicted_flip_rate"] <= 1
    kept = {n for n, t in rec["types"].items() if t == "Q8_0" and not n.startswith("token_embd")}
    assert all(any(n.startswith(f"blk.{g}.") for g in rec["keep_high"]) for n in kept)
    page = plot.write(res.data, tmp_path / "s.html").read_text()
    assert "plotly" in page and "Recipe" in page
    assert len(measured) == 1  # the reference is observed once for every file, the recipe's included


def test_canary_on_the_runtime_agrees_with_the_audit(both, toy_data, tmp_path):
    import emoscope as es
    from emoscope.stages.audit import AuditConfig, Candidate, audit
    from test_cli import cli

    lm = both[1]
    task, ev, hooks, causal = _evaluated(both, toy_data)
    acfg = AuditConfig.model_validate({"candidates": [{"name": "q8", "precision": "llama.cpp:Q8_0"},
                                                      {"name": "q2", "precision": "llama.cpp:Q2_K"}],
                                       "causal_features": causal, "n_boot": 200, "ablation_per_emotion": 2})
    out = audit(task, hooks, ev, None, None, acfg)
    canary = es.canary.write(task, hooks, ev, out, config={"n": 8})
    assert canary.meta["tolerance_from"] == ["q8"] or out.data["candidates"][1]["failed"]
    folder = canary.save(tmp_path / "canary")
    for row in out.data["candidates"]:  # the parity row, q8 and q2, each rebuilt as the audit builds it
        verdict = es.canary.check_candidate(canary, task, Candidate(name=row["name"], **row["changed"]), acfg)
        # the canary estimates the audit's flip rate (a third of its examples observed, the rest predicted) ...
        assert abs(verdict.predicted_flip_rate - row["flip_rate"]) <= 0.1, row["name"]
        # ... so its verdict is the audit's wherever the audit is not within that of its threshold
        if abs(row["flip_rate"] - acfg.thresholds.max_flip_rate) > 0.1:
            assert verdict.passed == (not row["failed"]), row["name"]
    # a serving process: the GGUF in llama.cpp, its own tokenizer checked against the canary's token ids
    assert es.canary.check(lm, folder).passed
    r = cli("canary", "check", folder, "--model", str(lm.path), "--backend", "llama.cpp", "--threads", 2, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["canary_flips"] == 0


def test_stages_refuse_a_backend_that_lacks_an_operation_through_the_api(both, toy_data):
    """Every stage names the operations it needs; given a llama.cpp model (scores and answer-position reads and
    edits only), the ones that need PyTorch hooks refuse in one line naming the operation and the backend, before
    any work, through the Python API; evaluate, which needs scores alone, runs."""
    import emoscope as es
    from emoscope.backends.base import NEEDS, OPERATIONS, supports

    from emoscope.backends.base import Backend

    ref, lm, _, _ = both
    assert isinstance(ref, Backend) and isinstance(lm, Backend)  # both implement the one model interface
    assert supports(ref) == frozenset(OPERATIONS) and supports(lm) == {"score", "read_answer", "edit_answer",
                                                                        "check_tokens", "logits"}
    task = es.Task(lm, dataset=str(toy_data), per_class=2)
    calls = {"saes": lambda: es.train_saes(lm, layers=[0]), "phases": lambda: es.phases(task, {}, None),
             "trace": lambda: es.trace(task, {}, None, None), "steer": lambda: es.steer(task, {}, None, None),
             "audit": lambda: es.audit(task, {}, None), "sensitivity": lambda: es.sensitivity(task, {}, None),
             "canary": lambda: es.canary.write(task, {}, None, None)}
    assert set(calls) == set(NEEDS) - {"evaluate"}
    for stage, call in calls.items():
        with pytest.raises(EmoscopeError, match=rf"^stage {stage} needs 'hooks' \(.*\), which backend llama.cpp does "
                                                r"not support \(it supports check_tokens, edit_answer, logits, "
                                                r"read_answer, score\)"):
            call()
    assert es.evaluate(task).n == len(task.load_examples()[0])


def test_sensitivity_is_a_stage_of_the_run_hashed_and_resumed(both, gguf_file, toy_data, tmp_path):
    """`emoscope sensitivity` runs the registered sensitivity stage into RUN_DIR/sensitivity/TARGET: a second call
    with the same settings is up to date (skipped, the same result), another audit threshold reruns it."""
    import yaml

    from emoscope.sae.io import save

    ref, _, prompts, _ = both
    for layer, sae in _saes(ref, prompts).items():
        save(sae, tmp_path / "saes" / f"blocks.{layer}.hook_resid_post")
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": str(gguf_file)}, "stages": ["evaluate", "saes", "audit"],
           "evaluate": {"data": {"dataset": str(toy_data), "per_class": 2}},
           "saes": {"pretrained": str(tmp_path / "saes"), "ce": False},
           "audit": {"candidates": [{"name": "same"}], "n_boot": 100, "ablation_per_emotion": 2,
                     "causal_features": {lab: [[1, 3 * i]] for i, lab in enumerate(["anger", "joy"])}},
           "sensitivity": {"target": "Q4_0", "reverse": False, "verify": False, "n_perm": 200, "threads": 2}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    first = cli("sensitivity", "--config", f, "--json")
    assert first.returncode == 0, first.stderr
    assert "stage sensitivity: running" in first.stderr
    out = tmp_path / "run" / "sensitivity" / "Q4_0"
    assert (out / "result.json").is_file() and (out / "sensitivity.html").is_file()
    again = cli("sensitivity", "--config", f, "--json")
    assert "stage sensitivity: up to date, skipped" in again.stderr, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    changed = cli("sensitivity", "--config", f, "--json", "--set", "audit.thresholds.max_flip_rate=0.5")
    assert "stage sensitivity: running" in changed.stderr, changed.stderr
