"""llama-perplexity's KL-divergence statistics from emoscope (deployment/kld.py), timed, and checked against
llama.cpp's own `llama-perplexity --kl-divergence` when its binary is given.

Usage: python bench/kld.py [--model gemma3-270m] [--type Q4_K_M] [--chunks 8] [--n-ctx 512] [--threads 2]
                           [--llama-perplexity PATH/TO/llama-perplexity] [--json out.json]

Both sides use the same files: the reference's F32 GGUF (the base) and llama.cpp's quantization of it to --type. The
base's next-token log-probs come from llama.cpp on the F32 file, the build's from llama.cpp on the quantized file, on
the first --chunks windows of --n-ctx tokens of WikiText-2 test. llama-perplexity tokenizes the text with llama.cpp's
tokenizer, emoscope with the reference's transformers tokenizer (the ids it feeds every backend): where the two agree
on the text, the windows are the same, and the figures must agree within llama-perplexity's reported errors.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from emoscope.backends import gguf_build
from emoscope.backends.llamacpp import LlamaCppModel
from emoscope.deployment import kld
from emoscope.models import gguf_source, load_model
from emoscope.data import data_dirs


def ours(a, f32: Path, qfile: Path, ref) -> tuple[kld.KLDStats, dict]:
    cfg = kld.KLDConfig(chunks=a.chunks, n_ctx=a.n_ctx)
    wins = kld.windows(ref.tokenizer, cfg)
    t0 = time.perf_counter()
    base = kld.base(LlamaCppModel(f32, ref.tokenizer, a.model, ref.chat, a.threads), wins)
    t1 = time.perf_counter()
    stats = kld.measure(base, LlamaCppModel(qfile, ref.tokenizer, a.model, ref.chat, a.threads))
    t2 = time.perf_counter()
    return stats, {"base_s": round(t1 - t0, 2), "measure_s": round(t2 - t1, 2), "tokens_scored": stats.n}


def theirs(a, f32: Path, qfile: Path) -> dict:
    """llama-perplexity's own figures: the base's logits saved from the F32 file, then the quantized file against
    them, on the same WikiText-2 test file and window size."""
    text = next(f for d in data_dirs() if (f := Path(d) / "wikitext2" / "test.txt").is_file())
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "base.kld"
        common = ["-c", str(a.n_ctx), "--chunks", str(a.chunks), "-t", str(a.threads), "-b", str(a.n_ctx)]
        subprocess.run([a.llama_perplexity, "-m", str(f32), "-f", str(text), "--kl-divergence-base", str(saved),
                        *common], check=True, capture_output=True, text=True)
        run = subprocess.run([a.llama_perplexity, "-m", str(qfile), "--kl-divergence-base", str(saved),
                              "--kl-divergence", *common], check=True, capture_output=True, text=True)
    log = run.stdout + run.stderr
    def grab(label):
        m = re.search(re.escape(label) + r"\s*:?\s*(-?[\d.]+)\s*±\s*([\d.]+)", log)
        return (float(m.group(1)), float(m.group(2))) if m else (None, None)
    return {"mean_kld": grab("Mean    KLD"), "same_top_p_pct": grab("Same top p"), "rms_dp_pct": grab("RMS Δp"),
            "ln_ppl_ratio": grab("Mean ln(PPL(Q)/PPL(base))")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-perplexity", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    ref = load_model(a.model)
    f32 = gguf_build.write_float_gguf(gguf_source(a.model)[0])
    qfile = gguf_build.quantize(f32, a.type, a.threads)
    stats, timing = ours(a, f32, qfile, ref)
    row = {"model": a.model, "type": a.type, "chunks": a.chunks, "n_ctx": a.n_ctx, **timing,
           **{f"emoscope_{k}": v for k, v in stats._asdict().items()}}
    if a.llama_perplexity:
        lp = theirs(a, f32, qfile)
        for key, (v, err) in lp.items():
            row[f"llama_perplexity_{key}"], row[f"llama_perplexity_{key}_err"] = v, err
        v, err = lp["mean_kld"]
        row["mean_kld_within_error"] = v is not None and abs(stats.mean_kld - v) <= max(err, stats.mean_kld_err)
    print("| figure | value |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
