"""Benchmark: emoscope's label scoring on llama.cpp against llama.cpp's own batched decode of the same tokens,
the eval callback's cost (reading one layer, every layer), and llama.cpp against transformers; one run, one CPU.

The baseline decodes every prompt whole on its own sequence, packed into batches of n_ubatch tokens with logits
at each prompt's last token, through llama-cpp-python's raw API with no callback: what a serving stack runs.
emoscope decodes the shared prefix once and copies it to each prompt's sequence, and runs the label continuations
on copies of each prompt (Gemma's Ekman labels are one token each). Target: emoscope at most 1.5x the baseline.
Usage: python bench/llamacpp.py [--model gemma3-270m] [--type Q4_K_M] [--n 60] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from emoscope.backends import gguf_build, llamacpp
from emoscope.data import load_split, select
from emoscope.models import gguf_source, load_model
from emoscope.task import Task
from emoscope.task.score import score_ids


def native_decode(path, prompts: list[list[int]], threads: int, n_ubatch: int = 512) -> np.ndarray:
    """llama.cpp's own batched decode: every prompt whole on its own sequence, logits at its last token [n, vocab]."""
    lib = llamacpp._lib()
    llamacpp._quiet(lib)
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 8192, n_ubatch, n_ubatch, llamacpp.SEQ_MAX
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = lib.llama_init_from_model(model, cp)
    mem, n_vocab = lib.llama_get_memory(ctx), lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    out = np.zeros((len(prompts), n_vocab), np.float32)
    batch = lib.llama_batch_init(n_ubatch, 0, 1)
    i = 0
    while i < len(prompts):
        rows, j = [], i
        while j < len(prompts) and len(rows) + len(prompts[j]) <= n_ubatch and j - i < llamacpp.SEQ_MAX:
            rows += [(t, k, j - i, k == len(prompts[j]) - 1) for k, t in enumerate(prompts[j])]
            j += 1
        for r, (t, pos, seq, last) in enumerate(rows):
            batch.token[r], batch.pos[r], batch.n_seq_id[r], batch.seq_id[r][0], batch.logits[r] = t, pos, 1, seq, last
        batch.n_tokens = len(rows)
        assert lib.llama_decode(ctx, batch) == 0
        lasts = [r for r, row in enumerate(rows) if row[3]]
        for m, r in enumerate(lasts):
            out[i + m] = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, r), shape=(n_vocab,))
        lib.llama_memory_clear(mem, True)
        i = j
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return out


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """The median of `repeat` runs (the first carries one-time warm-up), and the last result."""
    ts, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def measure(a) -> dict:
    ref = load_model(a.model)
    task = Task(ref, per_class=max(1, a.n // 6), shots=a.shots)
    rows, rep = load_split("goemotions_ekman", "test")
    ex = select(rows, task.classes, rep, per_class=max(1, a.n // 6), seed=0)
    prompts, labels = task.encode_all(e.text for e in ex), task.label_ids
    f32 = gguf_build.write_float_gguf(gguf_source(a.model)[0])
    qfile = gguf_build.quantize(f32, a.type, a.threads)
    q = llamacpp.LlamaCppModel(qfile, ref.tokenizer, a.model, ref.chat, a.threads)
    fl = llamacpp.LlamaCppModel(f32, ref.tokenizer, a.model, ref.chat, a.threads)
    mid, every = ref.n_layers // 2, list(range(ref.n_layers))
    t = {}
    t["native"], nat = timed(lambda: native_decode(qfile, prompts, a.threads))
    t["emoscope"], lp = timed(lambda: q.score_ids(prompts, labels))
    t["one_layer"], _ = timed(lambda: q.score_ids(prompts, labels, resid_layers=[mid]))
    t["all_layers"], _ = timed(lambda: q.score_ids(prompts, labels, resid_layers=every))
    t["f32"], lf = timed(lambda: fl.score_ids(prompts, labels))
    t["torch"], lt = timed(lambda: score_ids(ref, prompts, labels, task.config.batch_size), repeat=2)
    first = [lab[0] for lab in labels]
    nat_lp = llamacpp._log_softmax(nat)[:, first]
    # llama.cpp's own spread: the same prompts decoded one at a time against inside the batch
    alone = np.stack([native_decode(qfile, [p], a.threads)[0] for p in prompts[:20]])
    spread = float(np.abs(llamacpp._log_softmax(alone)[:, first] - nat_lp[:20]).max())
    single = all(len(lab) == 1 for lab in labels)
    return {"model": a.model, "type": a.type, "threads": a.threads, "n_prompts": len(prompts),
            "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])), "n_labels": len(labels),
            "runtime": llamacpp.version(), "cpu": _cpu(),
            **{f"{k}_s": round(v, 3) for k, v in t.items()},
            "emoscope_over_native": round(t["emoscope"] / t["native"], 3),
            "callback_one_layer_overhead": round(t["one_layer"] / t["emoscope"] - 1, 3),
            "callback_all_layers_overhead": round(t["all_layers"] / t["emoscope"] - 1, 3),
            "llamacpp_f32_speedup_vs_torch": round(t["torch"] / t["f32"], 2),
            "llamacpp_type_speedup_vs_torch": round(t["torch"] / t["emoscope"], 2),
            "max_abs_diff_vs_native": float(np.abs(lp - nat_lp).max()) if single else None,
            "native_alone_vs_batched_max_abs_diff": spread,
            "f32_max_abs_diff_vs_torch": float(np.abs(lf - lt).max())}


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--type", default="Q4_K_M", help="llama.cpp type of the scored file")
    ap.add_argument("--n", type=int, default=60, help="examples (balanced over the six labels)")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="write the figures here as a flat JSON object")
    a = ap.parse_args()
    fig = measure(a)
    table = Table(title=f"label scoring, {fig['n_prompts']} prompts, {fig['model']} {fig['type']}, "
                        f"{fig['threads']} threads ({fig['cpu']})")
    for col in ("what", "seconds", "ratio"):
        table.add_column(col)
    base = fig["native_s"]
    for what, key in [("llama.cpp's own batched decode (baseline)", "native_s"),
                      ("emoscope on llama.cpp (target <= 1.5x)", "emoscope_s"),
                      ("  + reading one layer", "one_layer_s"),
                      ("  + reading every layer", "all_layers_s"), ("emoscope on llama.cpp, F32 file", "f32_s"),
                      ("emoscope on transformers, float32", "torch_s")]:
        table.add_row(what, f"{fig[key]:.3f}", f"{fig[key] / base:.2f}")
    Console().print(table)
    print(f"label log-p, max |difference|: emoscope vs llama.cpp's batched decode {fig['max_abs_diff_vs_native']}; "
          f"llama.cpp alone vs batched (20 prompts) {fig['native_alone_vs_batched_max_abs_diff']:.3f}")
    print(json.dumps(fig))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
