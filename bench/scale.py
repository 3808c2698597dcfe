"""Benchmark: does the pipeline scale to 2B-class models with a pretrained-suite-shaped set of SAEs?

For each size, builds a random-weight Gemma-2 model from a `transformers` config (no download) — `2b`
is Gemma-2-2B's exact architecture and sizes (vocabulary 256,000, d_model 2304, 26 layers, softcaps,
sliding window) — and random JumpReLU SAEs of Gemma Scope's shape (16,384 latents at every layer, no
input normalisation, b_dec not subtracted, float32, SAELens layout), then runs `emoscope run`
(evaluate -> saes (load + quality) -> phases -> trace -> steer -> audit with a prompt and an int8
candidate) on a handful of GoEmotions examples in a fresh process. Reports per-stage seconds and
peak resident memory (each stage's own peak, from its timing.json), and the ratio of the run's peak
to the bytes of the model plus its SAEs (target <= 1.5).

The SAEs are random but calibrated to fire like trained ones: each layer's encoder directions are
scaled by that layer's residual RMS (measured on one prompt), with thresholds for about 64 active
latents per token. Random weights mean the analysis finds nothing: this measures time and memory.
The tokenizer is SmolLM2's (49,152 ids, all inside Gemma-2's vocabulary), taken from the embedded
GGUF, unless --tokenizer names a saved one.

Usage: python bench/scale.py [--sizes small,medium,2b] [--device cpu] [--dtype bfloat16] [--out DIR] [--keep]
                             [--json out.json]
(default sizes small,medium; 2b needs about 20 GB of memory and 15 GB of disk)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=4096, max_position_embeddings=8192, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)
SHORT = dict(sliding_window=256, max_position_embeddings=1024)  # tiny test models: short caches
# name: (config overrides of Gemma-2-2B, SAE width). `deep` (a narrow model with many layers and wide
# SAEs) and `tiny` are for the test suite.
SIZES = {
    "tiny": (dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, **SHORT), 256),
    "deep": (dict(vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=16, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, **SHORT), 2048),
    "small": (dict(hidden_size=576, intermediate_size=2304, num_hidden_layers=12, head_dim=64,
                   query_pre_attn_scalar=64), 4608),
    "medium": (dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=18), 16384),
    "2b": ({}, 16384),
}
TARGET_L0 = 64


def stage_config(run_dir: Path, model_dir: Path, sae_dir: Path, device: str, dtype: str) -> dict:
    """The whole pipeline on a handful of examples: 2 per emotion, tiny searches."""
    return {
        "run_dir": str(run_dir), "model": {"name": str(model_dir), "device": device, "dtype": dtype},
        "stages": ["evaluate", "saes", "phases", "trace", "steer", "audit"],
        "evaluate": {"data": {"per_class": 2}, "n_boot": 100},
        "saes": {"pretrained": str(sae_dir), "eval_seqs": 2, "eval_context": 64, "ce": False},
        "phases": {"n_boot": 10, "min_per_class": 2, "probe_folds": 2},
        "trace": {"examples": "all", "per_emotion": 2, "candidates": 2, "n_random": 2, "n_boot": 50,
                  "screen_check": 2},
        "steer": {"dev_per_class": 2, "features_per_emotion": [1], "strengths": [2.0], "per_emotion_strengths": [],
                  "rounds": 0, "dose": [0.0, 2.0], "transfer": [], "ppl_seqs": 2, "n_boot": 100},
        "audit": {"candidates": [{"name": "paraphrase_1", "template": {"instruction": "Which emotion does this "
                                                                                      "text express? Choose one of: "
                                                                                      "{options}."}},
                                 {"name": "int8", "precision": "int8"}],
                  "n_boot": 100, "ablation_per_emotion": 2},
    }


def tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from emoscope.models import REGISTRY
    gguf = REGISTRY["smollm2-135m-instruct"].gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_model(size: str, tok, dtype: torch.dtype, out: Path) -> tuple[list[float], int]:
    """Random Gemma-2 weights of the given size, saved as safetensors with the tokenizer; returns each
    layer's residual RMS on one prompt and the number of parameters."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    over, _ = SIZES[size]
    cfg = {**GEMMA2_2B, **over}
    cfg["vocab_size"] = cfg["vocab_size"] or len(tok)
    config = Gemma2Config(**cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype: no float32 copy of 2.6B weights
    try:
        model = Gemma2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    ids = tok("I can't believe you did that to me, after everything!", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1:]
    rms = [float(h[0, 1:].float().pow(2).mean().sqrt()) for h in hidden]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return rms, sum(p.numel() for p in model.parameters())


def build_saes(rms: list[float], d: int, width: int, out: Path, model_name: str) -> int:
    """Random JumpReLU SAEs in the SAELens layout, one layer at a time; returns their bytes."""
    from emoscope.sae.io import save
    from emoscope.sae.model import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    thr = math.sqrt(2) * torch.special.erfinv(torch.tensor(1 - 2 * TARGET_L0 / width)).item()  # N(0,1) quantile
    total = 0
    for layer, r in enumerate(rms):
        hook = f"blocks.{layer}.hook_resid_post"
        sae = SAE(SAEConfig(d_in=d, d_sae=width, architecture="jumprelu", hook_name=hook, model_name=model_name,
                            apply_b_dec_to_input=False, extra={"random": True}))
        u = torch.randn(width, d, generator=g)
        u /= u.norm(dim=1, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(u * r)  # a feature's decoder row has the size of the residual it writes to
            sae.W_enc.copy_(u.T / r)  # pre-activations ~ N(0, 1) on residuals of RMS r
            sae.threshold.fill_(thr)
        save(sae, out / hook)
        total += sum(p.numel() * 4 for p in sae.parameters())
        del sae, u
    return total


def run_size(size: str, a, tok, root: Path) -> dict:
    work = root / size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dt = getattr(torch, a.dtype)
    t0 = time.time()
    rms, n_params = build_model(size, tok, dt, work / "model")
    d = SIZES[size][0].get("hidden_size") or GEMMA2_2B["hidden_size"]
    sae_bytes = build_saes(rms, d, SIZES[size][1], work / "saes", str(work / "model"))
    build_s = time.time() - t0
    cfg = work / "run.yaml"
    cfg.write_text(yaml.safe_dump(stage_config(work / "run", work / "model", work / "saes", a.device, a.dtype)))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "emoscope.cli", "run", "--config", str(cfg)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: {size}: emoscope run failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    model_bytes = n_params * torch.finfo(dt).bits // 8
    row = {"size": size, "layers": len(rms), "d_model": d, "sae_width": SIZES[size][1], "params_m": n_params / 1e6,
           "model_gb": model_bytes / 2**30, "saes_gb": sae_bytes / 2**30, "build_s": build_s, "run_s": wall}
    peaks = []
    for stage in ("evaluate", "saes", "phases", "trace", "steer", "audit"):
        timing = json.loads((work / "run" / stage / "timing.json").read_text())
        row[f"{stage}_s"] = timing["stage_seconds"]
        row[f"{stage}_peak_gb"] = timing["cpu_peak_gb"]
        if "gpu_peak_gb" in timing:
            row[f"{stage}_gpu_peak_gb"] = timing["gpu_peak_gb"]
        peaks.append(timing["cpu_peak_gb"])
    row["peak_gb"] = max(peaks)
    row["peak_over_bytes"] = row["peak_gb"] / (row["model_gb"] + row["saes_gb"])
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def cpu_name() -> str:
    """The CPU model and whether it has AMX / AVX512-BF16 (bf16 speed differs 2x between them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    feats = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name}, {'+'.join(feats) or 'no bf16 instructions'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the models, SAEs and runs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sizes = a.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        raise SystemExit(f"error: unknown size {unknown[0]}: choose from {', '.join(SIZES)}")
    tok = tokenizer(a.tokenizer)
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="emoscope-scale-"))
    rows = [run_size(s, a, tok, root) for s in sizes]
    if not a.out and not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    cpu = cpu_name()
    t = Table(title=f"pipeline scale, {a.device} {a.dtype} ({cpu}, {os.cpu_count()} cores)")
    for col in ["size", "params (M)", "SAEs", "model+SAEs GB", "evaluate", "saes", "phases", "trace", "steer", "audit",
                "peak GB", "peak / bytes"]:
        t.add_column(col)
    for r in rows:
        t.add_row(r["size"], f"{r['params_m']:.0f}", f"{r['layers']} x {r['sae_width']}",
                  f"{r['model_gb'] + r['saes_gb']:.2f}",
                  *[f"{r[f'{s}_s']:.0f}s / {r[f'{s}_peak_gb']:.1f}" for s in
                    ("evaluate", "saes", "phases", "trace", "steer", "audit")],
                  f"{r['peak_gb']:.2f}", f"{r['peak_over_bytes']:.2f}")
    Console(width=200).print(t)
    print("stage cells: seconds / peak resident GB during the stage; target peak / bytes <= 1.5")
    if a.json:
        flat = {"device": a.device, "dtype": a.dtype, "cpu": cpu}
        for r in rows:
            flat.update({f"{r['size']}_{k}": v for k, v in r.items() if k != "size"})
        Path(a.json).write_text(json.dumps(flat, indent=2) + "\n")


if __name__ == "__main__":
    main()
