"""Benchmark: TopK SAE training throughput and quality, emoscope vs SAELens, same activations.

Both train a TopK SAE of the same size (expansion x d_model, k) on the same activations of one
layer, in the same order, with the same batch size and learning rate, for the same tokens; each
library keeps its own recommended loss settings. Activations are pre-scaled to mean squared norm
d_model for both. Reported: training tokens per second and FVU on held-out activations. SAELens is
run in float32 and with bf16 autocast; emoscope in float32, bf16 and its `auto` choice (what a run on
this machine uses). Also timed in the same run: one matmul of the encoder's shape [batch x d_in] @
[d_in x d_sae] in float32 and bf16; the training step's throughput as a fraction of the faster one's
(a step can not beat its own encoder matmul). Target: emoscope (auto) >= 2x SAELens's fastest setting
at equal or better FVU; the fraction above one half.
Usage: python bench/sae_train.py [--model gemma3-270m] [--layer 6] [--tokens 60000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from emoscope.hooks import HookPoint
from emoscope.models import load_model
from emoscope.sae.corpus import sequences
from emoscope.sae.train import SAETrainConfig, _batches, _fast_dtype, _harvest, fit


def harvest(view, layer: int, n: int, split: str, seed: int) -> torch.Tensor:
    hp = HookPoint(layer)
    out, got = [], 0
    batches = _batches(sequences(view, split, 128, seed), 16)
    while got < n:
        a = _harvest(view, [hp], next(batches))[hp.name]
        out.append(a)
        got += len(a)
    return torch.cat(out)[:n]


def fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = encode_decode(x)
    return float((r - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def train_saelens(x: torch.Tensor, d_sae: int, k: int, batch: int, lr: float, autocast: bool):
    device = str(x.device)
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, device=device))
    with torch.no_grad():  # as SAELens's runner does with b_dec_init_method="mean" (emoscope does the same)
        sae.b_dec.copy_(x.mean(0))
    cfg = SAETrainerConfig(total_training_samples=len(x) // batch * batch, train_batch_size_samples=batch, lr=lr,
                           lr_end=lr,
                           device=device, autocast=autocast, n_batches_for_norm_estimate=1)
    data = (x[i:i + batch] for i in range(0, len(x) - batch + 1, batch))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    t = time.perf_counter()
    trained = trainer.fit()
    return trained, time.perf_counter() - t


def matmul_seconds(x: torch.Tensor, d_sae: int, dtype: torch.dtype, reps: int = 20) -> float:
    """Median seconds of one [batch x d_in] @ [d_in x d_sae] matmul in `dtype` (the encoder's shape)."""
    a = x.to(dtype)
    w = torch.randn(d_sae, x.shape[1], device=x.device).to(dtype).T  # laid out as the trainer keeps W_enc
    times = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        a @ w
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(sorted(times[2:])[reps // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=61440)
    ap.add_argument("--test-tokens", type=int, default=8192)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default=None, help="save/load the harvested activations here (.pt)")
    a = ap.parse_args()
    view = load_model(a.model, device=a.device, dtype="float32")
    if a.cache and Path(a.cache).exists():
        cached = torch.load(a.cache, weights_only=True)
        x, xt = cached["x"], cached["xt"]
    else:
        x = harvest(view, a.layer, a.tokens, "train", 0)
        xt = harvest(view, a.layer, a.test_tokens, "eval", 0)
        if a.cache:
            torch.save({"x": x, "xt": xt}, a.cache)
    scale = float(x.pow(2).sum(-1).mean().sqrt() / math.sqrt(x.shape[1]))
    x, xt = x / scale, xt / scale
    d_sae = a.expansion * x.shape[1]
    rows = {}
    for name, fast in [("emoscope (auto)", "auto"), ("emoscope (bf16 encoder matmuls)", "bfloat16"),
                       ("emoscope (float32)", "float32")]:
        cfg = SAETrainConfig(expansion=a.expansion, k=a.k, batch_tokens=a.batch, lr=a.lr, fast_matmul=fast, seed=0)
        t = time.perf_counter()
        sae, _ = fit(x, cfg, f"blocks.{a.layer}.hook_resid_post")
        rows[name] = (time.perf_counter() - t, fvu(lambda z: sae(z).recon, xt))
    notes = {}
    for name, ac in [("SAELens TopK (float32)", False), ("SAELens TopK (bf16 autocast)", True)]:
        try:
            sae, secs = train_saelens(x, d_sae, a.k, a.batch, a.lr, ac)
            rows[name] = (secs, fvu(lambda z: sae.decode(sae.encode(z)), xt))
        except Exception as e:
            notes[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    trained = len(x) // a.batch * a.batch
    mm = {dt: matmul_seconds(x[:a.batch], d_sae, dt) for dt in (torch.float32, torch.bfloat16)}
    best_mm = min(mm.values())
    t = Table(title=f"TopK SAE training, {view.name} layer {a.layer}, d_sae={d_sae}, k={a.k}, {trained} tokens, batch "
                    f"{a.batch}")
    for c in ["method", "seconds", "tokens/s", "held-out FVU"]:
        t.add_column(c)
    for k, (s, f) in rows.items():
        t.add_row(k, f"{s:.1f}", f"{trained / s:.0f}", f"{f:.4f}")
    Console().print(t)
    for k, v in notes.items():
        Console().print(f"{k}: not measured ({v})")
    ours = rows["emoscope (auto)"]
    mm_tok_s = a.batch / best_mm
    figures = {"tokens": trained, "auto_dtype": str(_fast_dtype("auto", x.device)).replace("torch.", ""),
               "emoscope_tok_s": round(trained / ours[0], 1), "emoscope_fvu": round(ours[1], 4),
               "emoscope_fp32_tok_s": round(trained / rows["emoscope (float32)"][0], 1),
               "emoscope_fp32_fvu": round(rows["emoscope (float32)"][1], 4),
               "emoscope_bf16_tok_s": round(trained / rows["emoscope (bf16 encoder matmuls)"][0], 1),
               "emoscope_bf16_fvu": round(rows["emoscope (bf16 encoder matmuls)"][1], 4),
               "matmul_fp32_ms": round(mm[torch.float32] * 1e3, 2),
               "matmul_bf16_ms": round(mm[torch.bfloat16] * 1e3, 2),
               "matmul_tok_s": round(mm_tok_s, 1), "fraction_of_matmul": round(trained / ours[0] / mm_tok_s, 3)}
    for key, name in [("saelens", "SAELens TopK (float32)"), ("saelens_bf16", "SAELens TopK (bf16 autocast)")]:
        if name in rows:
            figures[f"{key}_tok_s"] = round(trained / rows[name][0], 1)
            figures[f"{key}_fvu"] = round(rows[name][1], 4)
            figures[f"speedup_vs_{key}"] = round(rows[name][0] / ours[0], 2)
    lens = [rows[n][0] for n in ("SAELens TopK (float32)", "SAELens TopK (bf16 autocast)") if n in rows]
    if lens:
        figures["speedup_vs_saelens_fastest"] = round(min(lens) / ours[0], 2)
    Console().print(f"encoder-shaped matmul: {mm[torch.float32] * 1e3:.1f} ms float32, "
                    f"{mm[torch.bfloat16] * 1e3:.1f} ms bf16; training reaches "
                    f"{figures['fraction_of_matmul']:.2f} of the faster one's tokens/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
