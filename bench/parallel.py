"""Benchmark: data parallelism, the pipeline in one process and under torchrun with N ranks, side by side.

Three runs of `emoscope run` on one config (evaluate -> saes -> phases -> trace -> steer), in fresh processes:
  A  one process, all cores (OMP threads = cores);
  B  N ranks (`torchrun --standalone --nproc_per_node N -m emoscope run`, gloo on CPU / nccl on CUDA, cores
     split between ranks) on a copy of A with the same SAEs, rerunning the example-parallel stages: their
     seconds beside A's, and whether every result file equals A's (the design: bit-identical);
  C  N ranks training the SAEs with DDP from scratch: tokens per second beside A's, and the held-out FVU;
  D  one process with as many threads as one rank has, rerunning B's stages on a copy of A: B must equal
     it bit for bit (float32 CPU kernels sum in another order with another thread count, so B and A
     may differ by round-off, which can flip a near-tie).
Prints a table (seconds per stage, speedup = A / B) and, with --json, a flat JSON object.

Usage: python bench/parallel.py [--model gemma3-270m] [--ranks 2] [--per-class 12] [--sae-tokens 60000]
                                [--layers 3,6,9,12] [--device cpu] [--json out.json]
       python bench/parallel.py --config quick     (a whole run config instead: the demo's, ~35 min on 2 cores)
On a 2-core CPU, N = 2 ranks have one core each where one process has two: the speedup says how much
better one process per core uses the machine than two threads in one process (no more cores are added).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from scale import cpu_name  # noqa: E402

EXAMPLE_STAGES = ["evaluate", "phases", "trace", "steer"]


def config(a, run_dir: Path, stages: list[str]) -> dict:
    if a.config:
        from emoscope.config import load_config

        cfg = load_config(a.config).model_dump(mode="json")
        return {**cfg, "run_dir": str(run_dir), "stages": [s for s in cfg["stages"] if s in stages]}
    return {
        "run_dir": str(run_dir), "stages": stages, "model": {"name": a.model, "device": a.device},
        "evaluate": {"data": {"dataset": a.dataset, "per_class": a.per_class}},
        "saes": {"train": {"tokens": a.sae_tokens, "layers": [int(x) for x in a.layers.split(",")],
                           "expansion": 4, "k": 16, "batch_tokens": 512, "buffer_tokens": 4096,
                           "seqs_per_forward": 8}, "eval_seqs": 8},
        "phases": {"min_per_class": 3, "n_boot": 20, "probe_folds": 2},
        "trace": {"examples": "all", "per_emotion": a.per_class // 2, "candidates": 3, "n_random": 3, "n_boot": 100},
        "steer": {"dev_per_class": a.per_class // 2, "features_per_emotion": [1, 2], "strengths": [1.5, 2.0],
                  "per_emotion_strengths": [], "dose": [], "transfer": [], "ppl_seqs": 4, "n_boot": 100},
    }


def launch(cmd: list[str], cfg: dict, work: Path, name: str, threads: int, extra=()) -> float:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    r = subprocess.run(cmd + ["-m", "emoscope", "run", "--config", str(path), *extra], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"error: run {name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return time.time() - t


def stage_seconds(run_dir: Path, stage: str) -> float:
    return json.loads((run_dir / stage / "timing.json").read_text())["stage_seconds"]


def identical(a: Path, b: Path, stages: list[str]) -> tuple[int, int]:
    """(result files byte-identical, files compared): JSON results and tables of the stages (activation stores
    are split into other shard files; steering.json names its run directory)."""
    same = total = 0
    for stage in stages:
        for f in sorted((a / stage).iterdir()):
            if f.is_file() and f.suffix in (".json", ".parquet") and f.name not in ("timing.json", "steering.json"):
                total += 1
                same += f.read_bytes() == (b / stage / f.name).read_bytes()
    return same, total


def mean_fvu(run_dir: Path) -> float:
    q = json.loads((run_dir / "saes" / "result.json").read_text())["quality"]
    return sum(v["fvu"] for v in q.values()) / len(q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dataset", default="goemotions_ekman")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--sae-tokens", type=int, default=60000)
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, help="a run config (path or shipped name) instead of the settings above")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="emoscope-parallel-"))
    for run in ("A", "B", "C", "D"):  # fresh runs: nothing resumed
        shutil.rmtree(work / run, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cores, n = os.cpu_count() or 1, a.ranks
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    example = EXAMPLE_STAGES + (["audit"] if a.config else [])
    stages = ["evaluate", "saes"] + example[1:]
    wall_a = launch([sys.executable], config(a, work / "A", stages), work, "A", cores)
    shutil.copytree(work / "A", work / "B")
    force = [x for s in example for x in ("--force", s)]
    wall_b = launch(torchrun, config(a, work / "B", stages), work, "B", max(cores // n, 1), force)
    launch(torchrun, config(a, work / "C", ["evaluate", "saes"]), work, "C", max(cores // n, 1))
    shutil.copytree(work / "A", work / "D")
    launch([sys.executable], config(a, work / "D", stages), work, "D", max(cores // n, 1), force)
    same, total = identical(work / "D", work / "B", example)
    same_a, _ = identical(work / "A", work / "B", example)
    rows = {s: (stage_seconds(work / "A", s), stage_seconds(work / "B", s)) for s in example}
    rows["saes (train + eval)"] = (stage_seconds(work / "A", "saes"), stage_seconds(work / "C", "saes"))
    tok = {k: json.loads((work / k / "saes" / "timing.json").read_text())["tokens_per_second"] for k in ("A", "C")}
    cpu = cpu_name() if a.device == "cpu" else a.device
    what = f"config {a.config}" if a.config else a.model
    t = Table(title=f"data parallel, 1 process vs {n} ranks, {what} on {a.device} ({cpu}, {cores} cores)")
    for col in ["stage", "1 process s", f"{n} ranks s", "speedup"]:
        t.add_column(col)
    for s, (x, y) in rows.items():
        t.add_row(s, f"{x:.1f}", f"{y:.1f}", f"{x / y:.2f}")
    Console(width=160).print(t)
    print(f"SAE training: {tok['A']:.0f} tok/s in one process, {tok['C']:.0f} with {n} ranks (DDP); held-out FVU "
          f"{mean_fvu(work / 'A'):.4f} vs {mean_fvu(work / 'C'):.4f}")
    print(f"example-parallel stages: {same} of {total} result files byte-identical to one process's with "
          f"{max(cores // n, 1)} thread(s) as each rank ({same_a} of {total} to one process with {cores})")
    if a.json:
        flat = {"model": config(a, work / "A", [])["model"]["name"], "config": a.config or "", "device": a.device,
                "cpu": cpu, "cores": cores, "ranks": n, "identical_files": same, "compared_files": total,
                "identical_files_all_threads": same_a, "wall_one_s": round(wall_a, 1),
                "wall_ranks_example_stages_s": round(wall_b, 1), "sae_tok_s_one": tok["A"], "sae_tok_s_ranks": tok["C"],
                "sae_fvu_one": round(mean_fvu(work / "A"), 4), "sae_fvu_ranks": round(mean_fvu(work / "C"), 4)}
        for s, (x, y) in rows.items():
            key = s.split()[0]
            flat.update({f"{key}_one_s": x, f"{key}_ranks_s": y, f"{key}_speedup": round(x / y, 3)})
        Path(a.json).write_text(json.dumps(flat, indent=2) + "\n")
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
