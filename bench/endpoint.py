"""Benchmark: the canary through a live llama-server against the same canary in-process, on the same GGUF file.

Starts llama-server (the binary `make llama-server` builds, or --server) on 127.0.0.1 with the file and the threads
given, waits until it answers, then times `es.canary.check` through the endpoint (connecting included, the server's
start not) and in llama.cpp in-process (the model's load included and, separately, excluded), each --repeat times,
and compares the verdicts and the calibrated label log-probs.
Usage: python bench/endpoint.py CANARY_DIR --gguf FILE [--server BIN] [--threads 2] [--repeat 3]
       [--server-arg=--no-jinja] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from emoscope import canary as cn
from emoscope.models import load_model

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def start(binary: str, gguf: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    """llama-server on a free local port: (process, URL, seconds until /health answered 200)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-np", "1", "-c", "4096", "--no-webui", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"error: llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("error: llama-server did not answer within 300 s")


def timed(make, canary: cn.Canary, repeat: int):
    """(seconds to make the model, [seconds per check], the last check, the calibrated log-probs, the endpoint's
    request counts)."""
    t0 = time.perf_counter()
    model = make()
    made = time.perf_counter() - t0
    times, res = [], None
    for _ in range(repeat):
        t1 = time.perf_counter()
        res = cn.check(model, canary)
        times.append(time.perf_counter() - t1)
    cal = cn.observe(canary, cn._task_on(canary, model)).cal
    return made, times, res, cal, dict(getattr(model, "requests", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("canary", type=Path)
    ap.add_argument("--gguf", type=Path, required=True, help="the served file")
    ap.add_argument("--server", default=str(REPO / ".venv/bin/llama-server"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="an argument for llama-server, e.g. "
                                                                       "--server-arg=--no-jinja (repeatable)")
    ap.add_argument("--json", default=None, help="write the figures here as a flat JSON object")
    a = ap.parse_args()
    canary = cn.Canary.load(a.canary)
    local = timed(lambda: load_model(str(a.gguf), backend="llama.cpp", threads=a.threads), canary, a.repeat)
    proc, url, up = start(a.server, a.gguf, a.threads, a.server_arg)
    try:
        remote = timed(lambda: load_model(url, backend="endpoint"), canary, a.repeat)
    finally:
        proc.terminate()
        proc.wait(30)
    fig = {"cpu": _cpu(), "threads": a.threads, "gguf": str(a.gguf), "n_canary": len(canary.meta["texts"]),
           "repeat": a.repeat, "server_start_s": round(up, 2),
           "inprocess_load_s": round(local[0], 2), "inprocess_check_s": round(float(np.median(local[1])), 3),
           "endpoint_connect_s": round(remote[0], 3), "endpoint_check_s": round(float(np.median(remote[1])), 3),
           "endpoint_over_inprocess": round(float(np.median(remote[1]) / np.median(local[1])), 2),
           "inprocess_passed": local[2].passed, "endpoint_passed": remote[2].passed,
           "server_args": " ".join(a.server_arg), "endpoint_template_drift": len(remote[2].template),
           "endpoint_drifted": "+".join(remote[2].drifted), "inprocess_drifted": "+".join(local[2].drifted),
           "endpoint_requests": remote[4]["completion"],
           "endpoint_whole_vocabulary_requests": remote[4]["whole_vocabulary"],
           "max_abs_cal_diff": float(np.abs(local[3] - remote[3]).max()),
           "inprocess_flips": local[2].canary_flips, "endpoint_flips": remote[2].canary_flips,
           "inprocess_predicted_flip_rate": round(local[2].predicted_flip_rate, 6),
           "endpoint_predicted_flip_rate": round(remote[2].predicted_flip_rate, 6),
           "endpoint_unchecked": "+".join(remote[2].unchecked), "inprocess_unchecked": "+".join(local[2].unchecked)}
    table = Table(title=f"canary of {fig['n_canary']} examples, {a.gguf.name}, {fig['cpu']}, {a.threads} threads")
    for col in ("path", "setup s", "check s (median)", "passed"):
        table.add_column(col)
    table.add_row("in-process llama.cpp", f"{fig['inprocess_load_s']} (load)", str(fig["inprocess_check_s"]),
                  str(fig["inprocess_passed"]))
    table.add_row("llama-server over HTTP", f"{fig['endpoint_connect_s']} (connect; start {fig['server_start_s']})",
                  str(fig["endpoint_check_s"]), str(fig["endpoint_passed"]))
    Console().print(table)
    print(f"endpoint / in-process check time: {fig['endpoint_over_inprocess']}x; largest calibrated log-prob "
          f"difference {fig['max_abs_cal_diff']:.2e}")
    for why in remote[2].template:
        print(f"template drift: {why}")
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
