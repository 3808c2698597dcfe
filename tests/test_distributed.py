"""Data parallelism with torch.distributed (gloo, CPU, 2 processes): the same results as one process.

Tolerance stated in docs/design.md: the example-parallel stages compute every batch exactly as one
process does, so their results must match to float round-off (rtol 1e-5, atol 1e-6; on this CPU they
are bit-identical); DDP SAE training averages gradients over ranks, so one step on two halves of a
batch equals one step on the whole batch to rtol 1e-4, and whole trainings (other shuffles) reach a
held-out FVU within 0.03 of one process's.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RTOL, ATOL = 1e-5, 1e-6
STAGES = ["evaluate", "saes", "phases", "trace", "steer", "audit"]


def _config(tmp_path, tiny_dir, toy_data, name, stages=STAGES, device="cpu") -> Path:
    cfg = {
        "run_dir": str(tmp_path / name), "model": {"name": str(tiny_dir), "device": device}, "stages": stages,
        "evaluate": {"data": {"dataset": str(toy_data), "per_class": 6}},
        "saes": {"train": {"tokens": 24000, "layers": [1, 2, 3], "expansion": 4, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 8},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 2},
        "trace": {"examples": "all", "per_emotion": 5, "candidates": 2, "n_random": 3, "n_boot": 50},
        "steer": {"dev_per_class": 4, "features_per_emotion": [1], "strengths": [1.5, 2.0],
                  "per_emotion_strengths": [0.5, 1.5], "rounds": 1, "dose": [0.0, 1.0], "transfer": [],
                  "ppl_seqs": 4, "n_boot": 100},
        "audit": {"ablation_per_emotion": 3, "n_boot": 100,
                  "candidates": [{"name": "int8", "precision": "int8"}, {"name": "lower", "text": "lower"},
                                 {"name": "shots", "shots": 1}]},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _close(a, b, where=""):
    """Equal structure, equal strings/ints/bools, floats within the stated tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)), where
        assert np.isclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _same_run_files(one: Path, two: Path, stages) -> list[str]:
    """Compare every result file of the stages; returns the files that are not byte-identical."""
    from emoscope.store import Store

    differ = []
    for stage in stages:
        for f in sorted((one / stage).rglob("*")):
            rel = f.relative_to(one)
            g = two / rel
            if f.is_dir() or f.name == "timing.json" or f.parent.name.startswith("store_"):
                continue
            assert g.is_file(), rel
            if f.read_bytes() == g.read_bytes():
                continue
            differ.append(str(rel))
            if f.suffix == ".json":
                a, b = json.loads(f.read_text()), json.loads(g.read_text())
                if f.name == "steering.json":  # names the run directory it was chosen in
                    a["chosen_on"].pop("run_dir"), b["chosen_on"].pop("run_dir")
                _close(a, b, str(rel))
            elif f.suffix == ".parquet":
                pd.testing.assert_frame_equal(pd.read_parquet(f), pd.read_parquet(g), rtol=RTOL, atol=ATOL)
            else:
                raise AssertionError(f"{rel} differs")
        for store in sorted((one / stage).glob("store_*")):  # rows split into other shard files; same rows
            a, b = Store(store), Store(two / store.relative_to(one))
            assert a.hooks == b.hooks and len(a) == len(b) and a.manifest["example_ids"] == b.manifest["example_ids"]
            for key in a.hooks + ["token_ids", "example_idx", "position"]:
                torch.testing.assert_close(a.read(key), b.read(key), rtol=RTOL, atol=ATOL)
    return differ


def test_two_ranks_write_the_same_results_as_one(parallel_bench):
    """`torchrun --nproc_per_node 2 -m emoscope run` (bench/parallel.py's run B): every example-parallel stage
    (evaluate, phases, trace, steer, audit) recomputed with 2 gloo ranks on the same SAEs equals one process's
    results with as many threads as a rank has (run D)."""
    one, two = parallel_bench / "D", parallel_bench / "B"
    before = (parallel_bench / "A" / "run.log").read_text()  # B began as a copy of run A
    log = (two / "run.log").read_text()
    assert log.startswith(before)
    log = log[len(before):]
    assert "data parallel: 2 ranks (gloo)" in log and "stage saes: up to date, skipped" in log
    for s in STAGES:
        if s != "saes":
            assert f"stage {s}: running" in log
            assert json.loads((two / s / "timing.json").read_text())["ranks"] == 2
    differ = _same_run_files(one, two, [s for s in STAGES if s != "saes"])
    assert differ == ["steer/steering.json"]  # on this CPU the rest is bit-identical (only the run_dir differs)
    assert not [p for p in two.iterdir() if p.name.startswith(".")]  # no leftovers


def test_ddp_sae_training_matches_one_process(parallel_bench):
    """The saes stage under 2 ranks (bench/parallel.py's run C: each its share of the corpus, gradients
    all-reduced): SAEs of the same shapes whose held-out quality is within the stated tolerance of one
    process's (run A)."""
    qa = json.loads((parallel_bench / "A" / "saes" / "result.json").read_text())
    qb = json.loads((parallel_bench / "C" / "saes" / "result.json").read_text())
    assert "data parallel: 2 ranks (gloo)" in (parallel_bench / "C" / "run.log").read_text()
    assert qa["train"]["tokens"] == qb["train"]["tokens"] >= 24000
    for h in qa["quality"]:
        fa, fb = qa["quality"][h]["fvu"], qb["quality"][h]["fvu"]
        assert abs(fa - fb) < 0.03, (h, fa, fb)
        assert fb < 0.5  # trained, not the initialisation
        assert qa["quality"][h]["l0"] == qb["quality"][h]["l0"] == 4.0


# ---------------------------------------------------------------------------- one DDP step, exactly
def _ddp_steps(rank, world, init_file, arch, x, out_dir):
    import torch.distributed as tdist

    from emoscope.hooks import HookPoint
    from emoscope.sae.train import SAETrainConfig, _Layer

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = SAETrainConfig(architecture=arch, expansion=4, k=4, batch_tokens=64)
        mine = torch.cat([x[i * 64 + rank * (64 // world): i * 64 + (rank + 1) * (64 // world)]
                          for i in range(x.shape[0] // 64)])
        st = _Layer.start(cfg, HookPoint.parse("blocks.0.hook_resid_post"), mine, "m", torch.device("cpu"))
        for i in range(0, len(mine), 64 // world):
            st.step(mine[i:i + 64 // world] / st.scale, cfg, torch.float32)
        buf = io.BytesIO()
        torch.save({k: v for k, v in st.state()["params"].items()} | {"scale": torch.tensor(st.scale)}, buf)
        (Path(out_dir) / f"rank{rank}.pt").write_bytes(buf.getvalue())
        tdist.barrier()  # neither rank leaves (and removes the store file) while the other still uses it
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_one_ddp_step_equals_a_step_on_the_whole_batch(tmp_path, arch):
    """Each of 2 ranks steps on its half of every 64-token batch; the parameters equal (within rtol
    1e-4) those of one process stepping on whole batches, and both ranks hold the same parameters."""
    import torch.multiprocessing as mp

    from emoscope.hooks import HookPoint
    from emoscope.sae.train import SAETrainConfig, _Layer

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mp.spawn(_ddp_steps, args=(2, tmp_path / "init", arch, x, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cfg = SAETrainConfig(architecture=arch, expansion=4, k=4, batch_tokens=64)
    st = _Layer.start(cfg, HookPoint.parse("blocks.0.hook_resid_post"), x, "m", torch.device("cpu"))
    for i in range(0, 256, 64):
        st.step(x[i:i + 64] / st.scale, cfg, torch.float32)
    whole = st.state()["params"]
    assert float(ranks[0]["scale"]) == pytest.approx(st.scale, rel=1e-5)
    for name, p in whole.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], p, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- failing ranks
RANK_SCRIPT = """
import os, sys, time
from emoscope import distributed as dist
from emoscope.errors import EmoscopeError
dist.init()
def local():
    if dist.rank() == 1:
        if sys.argv[1] == "crash":
            os._exit(3)  # a rank that dies (out of memory, killed)
        raise EmoscopeError("non-finite activations on rank 1")
    return [1.0]
try:
    dist.gather(local)
except EmoscopeError as e:
    print(f"rank {dist.rank()}: error: {e}", flush=True)
    sys.exit(2)
"""


@pytest.mark.parametrize("how", ["error", "crash"])
def test_a_failing_rank_fails_the_run_on_every_rank_without_hanging(tmp_path, how):
    """An EmoscopeError on one rank inside a shared loop is raised on every rank; a rank that dies
    makes torchrun stop the others. Either way the launch ends, non-zero, within seconds."""
    import time

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    t = time.time()
    out = subprocess.run(TORCHRUN + [str(script), how], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode != 0 and time.time() - t < 100
    if how == "error":
        assert "rank 0: error: non-finite activations on rank 1" in out.stdout
        assert "rank 1: error: non-finite activations on rank 1" in out.stdout


# ---------------------------------------------------------------------------- model.device_map (accelerate)
OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
           "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def test_an_offloaded_model_gives_the_same_numbers(tmp_path, tiny_dir):
    """`model.device_map` with CPU and disk offload: accelerate's dispatch hooks sit on real layers (their
    weights are meta placeholders here), and label scores, recorded activations, cached answer passes,
    SAE splices (ablation, attribution), feature edits and activation capture equal the plain model's.
    Precision candidates, which change weights in place, are refused in one line."""
    from accelerate.hooks import AlignDevicesHook
    from test_causal import _setup

    from emoscope.errors import EmoscopeError
    from emoscope.hooks import HookPoint
    from emoscope.interventions.answers import answer_batches
    from emoscope.interventions.edits import Edit, apply_edits
    from emoscope.interventions.effects import ablate, attribution
    from emoscope.interventions.perturb import precision_applied
    from emoscope.models import ModelConfig, load_model
    from emoscope.store import capture_to_store
    from emoscope.task.score import score_ids

    plain = load_model(ModelConfig(name=str(tiny_dir), device="cpu"))
    off = load_model(ModelConfig(name=str(tiny_dir), device="cpu", device_map=OFFLOAD,
                                 offload_folder=str(tmp_path / "offload")))
    assert all(isinstance(getattr(b, "_hf_hook", None), AlignDevicesHook) for b in off.blocks)
    assert off.offloaded and not plain.offloaded and off.device == torch.device("cpu")
    assert off.blocks[1].self_attn.q_proj.weight.device.type == "meta"
    _, saes, prompts, tokens, gold = _setup()
    np.testing.assert_array_equal(score_ids(off, prompts, [[5], [6, 7]]), score_ids(plain, prompts, [[5], [6, 7]]))
    a, b = answer_batches(off, prompts, 4), answer_batches(plain, prompts, 4)
    feats = {1: [0, 3, 5], 2: [1, 2]}
    np.testing.assert_array_equal(ablate(off, saes, a, gold, tokens, feats),
                                  ablate(plain, saes, b, gold, tokens, feats))
    (ea, ma), (eb, mb) = attribution(off, saes, a, gold, tokens), attribution(plain, saes, b, gold, tokens)
    np.testing.assert_array_equal(ma, mb)
    for layer in saes:
        np.testing.assert_array_equal(ea[layer], eb[layer])
    edits = [Edit(layer=1, feature=3, mode="add", value=2.0)]
    with torch.no_grad(), apply_edits(off, saes, edits, a[0].last):
        la, _ = a[0].logits(off, tokens)
    with torch.no_grad(), apply_edits(plain, saes, edits, b[0].last):
        lb, _ = b[0].logits(plain, tokens)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    hooks = [HookPoint(1), HookPoint(3, "mlp_out")]
    enc = [(p, list(range(len(p)))) for p in prompts]
    ids = [f"e{i}" for i in range(len(prompts))]
    sa = capture_to_store(off, enc, ids, hooks, "all", tmp_path / "a")
    sb = capture_to_store(plain, enc, ids, hooks, "all", tmp_path / "b")
    for h in hooks:
        assert torch.equal(sa.read(h.name), sb.read(h.name))
    with pytest.raises(EmoscopeError, match="offloaded"):
        with precision_applied(off, "int8"):
            pass
