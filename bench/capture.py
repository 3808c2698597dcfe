"""Benchmark: cost of capturing every layer's residual stream, against a plain forward of the same
batches, side by side with TransformerLens (TransformerBridge.run_with_cache) and nnsight when they
import and run offline. Target: emoscope capture <= 1.10x a plain forward.
Usage: python bench/capture.py [--model gemma3-270m] [--batches 6] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from emoscope.hooks import all_resid, pad_batch, record
from emoscope.models import load_model
from emoscope.sae.corpus import sequences


def _time(fn, batches, repeats):
    fn(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--seqs", type=int, default=8, help="sequences per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    view = load_model(a.model, device=a.device, dtype="float32")
    stream = sequences(view, "eval", 128, 0)
    batches = [pad_batch([next(stream) for _ in range(a.seqs)], "cpu") for _ in range(a.batches)]
    n_tok = sum(int(m.sum()) for _, m in batches)
    hooks = all_resid(view)
    kept = []

    @torch.no_grad()
    def plain(b):
        view.model(input_ids=b[0], attention_mask=b[1], logits_to_keep=1)

    @torch.no_grad()
    def ours(b):
        with record(view, hooks) as acts:
            view.model(input_ids=b[0], attention_mask=b[1], logits_to_keep=1)
        kept[:] = [acts]  # keep every layer's activations alive, as a consumer would

    rows = {"plain forward": _time(plain, batches, a.repeats),
            "emoscope capture (all layers)": _time(ours, batches, a.repeats)}
    notes = {}
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(view.path, hf_model=view.model, tokenizer=view.tokenizer,
                                                     device=str(view.device))
        names = [f"blocks.{layer}.hook_resid_post" for layer in range(view.n_layers)]

        @torch.no_grad()
        def tl(b):
            _, cache = bridge.run_with_cache(b[0], attention_mask=b[1], names_filter=lambda n: n in names)
            kept[:] = [cache]
        rows["TransformerLens bridge run_with_cache"] = _time(tl, batches, a.repeats)
    except Exception as e:  # not installed, or cannot run offline on this model
        notes["TransformerLens"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    try:
        from nnsight import LanguageModel

        lm = LanguageModel(view.model, tokenizer=view.tokenizer)
        layers = lm
        for part in view.blocks_path.split("."):
            layers = getattr(layers, part)

        @torch.no_grad()
        def nn(b):
            # append to a list that exists outside the trace block: names first bound inside it
            # (or in a comprehension) are not reliably handed back by nnsight 0.5+
            saved = []
            with lm.trace({"input_ids": b[0], "attention_mask": b[1]}):
                for i in range(view.n_layers):
                    saved.append(layers[i].output.save())
            kept[:] = [saved]
        rows["nnsight trace + save"] = _time(nn, batches, a.repeats)
    except Exception as e:
        notes["nnsight"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    base = rows["plain forward"]
    t = Table(title=f"capture of {view.n_layers} residual streams, {view.name}, {a.batches} batches, {n_tok} tokens, "
                    f"best of {a.repeats}")
    for c in ["method", "seconds", "ratio to plain forward"]:
        t.add_column(c)
    for k, v in rows.items():
        t.add_row(k, f"{v:.3f}", f"{v / base:.3f}")
    Console().print(t)
    for k, v in notes.items():
        Console().print(f"{k}: not measured ({v})")
    figures = {"tokens": n_tok, "plain_s": round(base, 4),
               "capture_ratio": round(rows["emoscope capture (all layers)"] / base, 4)}
    if "TransformerLens bridge run_with_cache" in rows:
        figures["transformer_lens_ratio"] = round(rows["TransformerLens bridge run_with_cache"] / base, 4)
    if "nnsight trace + save" in rows:
        figures["nnsight_ratio"] = round(rows["nnsight trace + save"] / base, 4)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
