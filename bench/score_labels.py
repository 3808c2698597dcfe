"""Benchmark: shared-prefix label scoring vs one full forward per (prompt, label), same examples.

Prints the speed-up, the largest absolute difference in label log-probs (they must agree to float
tolerance), and the float32 vs bfloat16 speed and agreement of the fast path (the `auto` dtype).
Usage: python bench/score_labels.py [--model gemma3-270m] [--n 24] [--shots 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from emoscope.data import load_split, select
from emoscope.models import load_model
from emoscope.task import Task
from emoscope.task.score import score_ids, score_naive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--n", type=int, default=24, help="examples (balanced over the six labels)")
    ap.add_argument("--shots", type=int, default=6)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", default=None, help="write the figures here as a flat JSON object")
    a = ap.parse_args()

    per_class = max(1, a.n // 6)
    rows, rep = load_split("goemotions_ekman", "test")
    figures = {}
    times = {}
    for dtype in ["float32", "bfloat16"]:
        view = load_model(a.model, device=a.device, dtype=dtype)
        task = Task(view, per_class=per_class, shots=a.shots)
        ex = select(rows, task.classes, rep, per_class=per_class, seed=0)
        prompts = task.encode_all(e.text for e in ex)
        labels = task.label_ids
        score_ids(view, prompts[:2], labels)  # warm-up
        t = time.perf_counter()
        fast = score_ids(view, prompts, labels, batch_size=8)
        times[dtype] = time.perf_counter() - t
        if dtype == "float32":
            t = time.perf_counter()
            ref = score_naive(view, prompts, labels)
            t_naive = time.perf_counter() - t
            fast32 = fast
            figures.update(n_examples=len(ex), n_labels=len(labels),
                           mean_prompt_tokens=float(np.mean([len(p) for p in prompts])),
                           naive_s=round(t_naive, 3), shared_prefix_s=round(times[dtype], 3),
                           speedup=round(t_naive / times[dtype], 2), max_abs_diff=float(np.abs(fast - ref).max()))
        else:
            figures.update(bf16_s=round(times[dtype], 3),
                           bf16_speedup_vs_fp32=round(times["float32"] / times[dtype], 2),
                           bf16_max_abs_diff=float(np.abs(fast - fast32).max()),
                           bf16_argmax_agreement=float((fast.argmax(1) == fast32.argmax(1)).mean()))
    t = Table(title=f"label scoring, {a.model}, {figures['n_examples']} examples x {figures['n_labels']} labels, "
                    f"{a.shots}-shot, ~{figures['mean_prompt_tokens']:.0f} prompt tokens")
    for c in ["method", "seconds", "ratio", "max |Δ log-prob|"]:
        t.add_column(c)
    t.add_row("naive: one forward per label (fp32)", f"{figures['naive_s']:.2f}", "1.00", "reference")
    t.add_row("shared prefix + batched labels (fp32)", f"{figures['shared_prefix_s']:.2f}",
              f"{figures['speedup']:.2f}x", f"{figures['max_abs_diff']:.2e}")
    t.add_row("shared prefix + batched labels (bf16)", f"{figures['bf16_s']:.2f}",
              f"{figures['naive_s'] / figures['bf16_s']:.2f}x",
              f"{figures['bf16_max_abs_diff']:.2e} vs fp32; argmax agrees {figures['bf16_argmax_agreement']:.0%}")
    Console().print(t)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
