"""GPU checks (`pytest -m gpu`): the pipeline on CUDA matches the CPU within stated tolerances, and no
stage moves SAEs or activations between devices behind the user's back. They skip without CUDA (CI
has none); run them when a GPU is at hand.

Tolerances (float32 on both devices; CUDA reductions run in another order):
- label log-probabilities: |delta| <= 1e-3; predictions equal wherever the top-two gap exceeds 1e-3;
- phases: the same boundaries; per-layer probe accuracy within 0.05;
- tracing: exact effects of the features validated on both devices within 1e-2 nats.
"""

import numpy as np
import pytest
import torch

import emoscope as es

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with a GPU: pytest -m gpu)")]

PHASES = {"min_per_class": 3, "n_boot": 10, "probe_folds": 2}
TRACE = {"examples": "all", "per_emotion": 3, "candidates": 2, "n_random": 3, "n_boot": 50}


def _on(device, tiny_dir, toy_data, sae_dir):
    model = es.load_model(str(tiny_dir), device=device, dtype="float32")
    task = es.Task(model, dataset=str(toy_data), per_class=4)
    saes = es.load_saes(sae_dir, model)
    ev = es.evaluate(task)
    ph = es.phases(task, saes, ev, PHASES)
    tr = es.trace(task, saes, ev, ph, TRACE)
    return model, saes, ev, ph, tr


def _all_on(saes, kind):
    return all(p.device.type == kind for s in saes.values() for p in s.parameters())


def test_pipeline_on_cuda_matches_cpu(tiny_dir, toy_data, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cpu = es.load_model(str(tiny_dir), device="cpu", dtype="float32")
    trained = es.train_saes(cpu, layers=[1, 3], tokens=4000, expansion=4, k=4, batch_tokens=256, buffer_tokens=1024,
                            seqs_per_forward=4, eval_seqs=8)
    trained.save(tmp_path / "saes")
    _, saes_c, ev_c, ph_c, tr_c = _on("cpu", tiny_dir, toy_data, tmp_path / "saes")
    model_g, saes_g, ev_g, ph_g, tr_g = _on("cuda", tiny_dir, toy_data, tmp_path / "saes")
    assert model_g.device.type == "cuda" and _all_on(saes_g, "cuda") and _all_on(saes_c, "cpu")
    a, b = ev_c.to_frame(), ev_g.to_frame()
    cols = [c for c in a.columns if c.startswith("logp_")] or [c for c in a.columns if c.startswith("p_")]
    assert cols and np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() <= 1e-3
    gap = np.sort(a[cols].to_numpy(), 1)
    clear = (gap[:, -1] - gap[:, -2]) > 1e-3
    assert (a.pred_raw.to_numpy()[clear] == b.pred_raw.to_numpy()[clear]).all()
    assert ph_c.data["boundaries"] == ph_g.data["boundaries"]
    fc, fg = tr_c.to_frame(), tr_g.to_frame()
    both = fc.merge(fg, on=["emotion", "phase", "layer", "feature"], suffixes=("_c", "_g"))
    assert len(both) and (both.effect_c - both.effect_g).abs().max() <= 1e-2


def test_sae_training_on_cuda_keeps_buffers_on_cpu_and_saes_on_gpu(tiny_dir, shared_data, tmp_path):
    model = es.load_model(str(tiny_dir), device="cuda", dtype="float32")
    res = es.train_saes(model, layers=[1, 2], tokens=3000, expansion=4, k=4, batch_tokens=256, buffer_tokens=1024,
                        seqs_per_forward=4, eval_seqs=4)
    assert _all_on(res.saes, "cuda") and all(np.isfinite(q["fvu"]) for q in res.data["quality"].values())
    res.save(tmp_path / "s")
    assert _all_on(es.SAEsResult.load(tmp_path / "s", model).saes, "cuda")
    assert _all_on(es.SAEsResult.load(tmp_path / "s", model, device="cpu").saes, "cpu")


def test_bench_scripts_take_cuda(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    r = subprocess.run([sys.executable, str(bench / "scale.py"), "--device", "cuda", "--sizes", "tiny",
                        "--json", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_device_map_over_gpus_and_cpu_matches_one_device(tiny_dir, toy_data, tmp_path):
    """A model spread by accelerate over every GPU and the CPU (offload) scores and ablates as on one
    GPU (within the tolerance above): activations and SAEs meet on the right device at every layer."""
    from emoscope.models import ModelConfig, load_model

    n = torch.cuda.device_count()
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": n - 1, "model.layers.2": "cpu",
          "model.layers.3": n - 1, "model.norm": n - 1, "model.rotary_emb": 0, "lm_head": n - 1}
    one = load_model(ModelConfig(name=str(tiny_dir), device="cuda"))
    spread = load_model(ModelConfig(name=str(tiny_dir), device="cuda", device_map=dm))
    task_a = es.Task(one, dataset=str(toy_data), per_class=4)
    task_b = es.Task(spread, dataset=str(toy_data), per_class=4)
    texts = [e.text for e in task_a.examples()]
    np.testing.assert_allclose(task_b.score(texts), task_a.score(texts), atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_match_one_gpu(tmp_path, tiny_dir, toy_data, shared_data):
    """`torchrun --nproc_per_node 2` on 2 GPUs (nccl): the example-parallel stages on one process's SAEs
    give one GPU's predictions (label log-probabilities within the tolerance above)."""
    import json
    import shutil
    import subprocess
    import sys

    import pandas as pd
    from test_distributed import TORCHRUN, _config

    stages = ["evaluate", "saes", "phases", "trace"]
    one = _config(tmp_path, tiny_dir, toy_data, "one", stages, device="cuda")
    two = _config(tmp_path, tiny_dir, toy_data, "two", stages, device="cuda")
    out = subprocess.run([sys.executable, "-m", "emoscope", "run", "--config", str(one)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    force = [a for s in ("evaluate", "phases", "trace") for a in ("--force", s)]
    out = subprocess.run(TORCHRUN + ["-m", "emoscope", "run", "--config", str(two)] + force, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 ranks (nccl)" in (tmp_path / "two" / "run.log").read_text()
    a = pd.read_parquet(tmp_path / "one" / "evaluate" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "two" / "evaluate" / "predictions.parquet")
    cols = [c for c in a if c.startswith("logp_")]
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), atol=1e-3)
    assert json.loads((tmp_path / "two" / "trace" / "timing.json").read_text())["ranks"] == 2
