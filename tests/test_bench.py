"""Benchmarks that cannot rot: every `bench/` script runs once with tiny settings on a tiny model (a check
of its code path and its `--json` output, not of its speed; figures come from full runs, see
docs/benchmarks.md)."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir, toy_data, shared_data):
    from emoscope.config import RunConfig
    from emoscope.pipeline import run
    d = tmp_path_factory.mktemp("bench")
    run(RunConfig.model_validate({
        "run_dir": str(d / "run"), "model": {"name": str(tiny_dir)}, "stages": ["evaluate", "saes", "phases", "audit"],
        "evaluate": {"data": {"dataset": str(toy_data), "per_class": 4}},
        "saes": {"train": {"tokens": 3000, "layers": [1, 3], "expansion": 2, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 4, "ce": False},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 2},
        "audit": {"candidates": [{"name": "same"}, {"name": "int8", "precision": "int8"},
                                 {"name": "typos", "text": "typos"}], "n_boot": 100, "ablation_per_emotion": 2}}),
        log=lambda s: None)
    return d / "run"


def test_every_bench_script_is_covered():
    assert {p.name for p in BENCH.glob("*.py")} == set(ARGS), "a new bench script needs its tiny settings here"


ARGS = {
    "score_labels.py": lambda tiny, run: ["--model", tiny, "--n", "6", "--shots", "1"],
    "capture.py": lambda tiny, run: ["--model", tiny, "--batches", "2", "--seqs", "2", "--repeats", "1"],
    "sae_train.py": lambda tiny, run: ["--model", tiny, "--layer", "1", "--tokens", "1024", "--test-tokens", "256",
                                       "--expansion", "2", "--k", "4", "--batch", "256"],
    "sae_quality.py": lambda tiny, run: [run, "--positions", "8", "--seeds", "2"],
    "trace.py": lambda tiny, run: [run, "--n", "2", "--topk", "2", "--sample", "2", "--whole", "1"],
    # the large-model path on a narrow model with many layers and wide SAEs (the tiny model's tokenizer)
    "scale.py": lambda tiny, run: ["--sizes", "deep", "--tokenizer", tiny],
    # run once by the `parallel_bench` fixture (conftest.py) on test_distributed's config, whose checks read it too
    "parallel.py": None,
    # a tiny random GGUF (SmolLM2's tokenizer), which both backends load
    "llamacpp.py": lambda tiny, run: ["--model", _tiny_gguf(run.parent / "tiny.gguf"), "--n", "6", "--threads", "2"],
    # the run's audit (three candidates); no GGUF behind the tiny model, so no served-file timing
    "canary.py": lambda tiny, run: [run, "--n", "6"],
    # llama-perplexity's statistics of the tiny GGUF's Q8_0 against its F32 (no llama-perplexity binary here)
    "kld.py": lambda tiny, run: ["--model", _tiny_gguf(run.parent / "tiny.gguf"), "--type", "Q8_0", "--chunks", "2",
                                 "--n-ctx", "32"],
    # a real llama-server on a tiny Qwen2 GGUF and its canary: run in test_endpoint.py, beside that server's tests
    "endpoint.py": None,
}


def _tiny_gguf(path):
    from tiny import tiny_gguf
    return path if path.exists() else tiny_gguf(path)
KEYS = {"score_labels.py": "speedup", "capture.py": None, "sae_train.py": None,
        "trace.py": "speedup_vs_cached_exhaustive", "scale.py": "deep_peak_over_bytes",
        "parallel.py": "evaluate_speedup", "llamacpp.py": "emoscope_over_native", "canary.py": "agreement_share",
        "sae_quality.py": "replay_identical", "kld.py": "emoscope_mean_kld", "endpoint.py": "endpoint_check_s"}


# a script that starts processes of its own (emoscope run) runs as from a shell; the others run in this process
# as `python bench/SCRIPT` would (its __main__, its argv, its exit code), 3-4 s of imports less each
SPAWNING = {"scale.py"}


def _run_here(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *argv])
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), f"{script} exited with {e.code}"


@pytest.mark.parametrize("script", sorted(k for k, v in ARGS.items() if v is not None or k == "parallel.py"))
def test_bench_script_runs(script, tiny_dir, tiny_run, tmp_path, monkeypatch, request):
    out = tmp_path / "figures.json"
    if script == "parallel.py":  # run by the shared fixture
        out = request.getfixturevalue("parallel_bench") / "figures.json"
    else:
        argv = [*map(str, ARGS[script](tiny_dir, tiny_run)), "--json", str(out)]
        if script in SPAWNING:
            r = subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            _run_here(script, argv, monkeypatch)
    figures = json.loads(out.read_text())
    assert isinstance(figures, dict) and figures
    assert all(not isinstance(v, (dict, list)) for v in figures.values()), "--json writes a flat object"
    if KEYS[script]:
        assert KEYS[script] in figures
    if script == "sae_quality.py":  # replaying the blocks before the hook changes no number
        assert figures["replay_identical"] is True
    if script == "parallel.py":  # 2 ranks wrote one process's results
        assert figures["ranks"] == 2 and figures["identical_files"] == figures["compared_files"] > 0
    if script == "scale.py":  # every stage ran and recorded its time and peak memory
        stages = ("evaluate", "saes", "phases", "trace", "steer", "audit")
        assert all(figures[f"deep_{s}_s"] > 0 and figures[f"deep_{s}_peak_gb"] > 0 for s in stages)
        assert figures["deep_layers"] == 16 and figures["deep_sae_width"] == 2048


def test_canary_agreement_out_of_sample(tiny_run, tmp_path, monkeypatch):
    """--holdout: the canary is written from an audit of one half of the examples and compared with an audit of the
    other half, so the canary's examples and the audit it is judged against share none."""
    out = tmp_path / "holdout.json"
    _run_here("canary.py", [str(tiny_run), "--n", "4", "--holdout", "--json", str(out)], monkeypatch)
    fig = json.loads(out.read_text())
    ev = json.loads((tiny_run / "evaluate" / "result.json").read_text())
    assert fig["holdout"] is True and fig["n_audited"] + fig["n_judged"] == ev["n"] and fig["n_judged"] >= ev["n"] // 2
    rows = json.loads(out.with_suffix(".rows.json").read_text())
    canary = json.loads((tiny_run / "canary-holdout" / "canary.json").read_text())
    from emoscope.stages.evaluate import EvalResult
    a, b = runpy.run_path(str(BENCH / "canary.py"))["halves"](EvalResult.load(tiny_run / "evaluate"))
    assert set(a.predictions.text).isdisjoint(b.predictions.text)
    assert len(rows) == fig["n_candidates"] == 3 and set(canary["texts"]) <= set(a.predictions.text)
