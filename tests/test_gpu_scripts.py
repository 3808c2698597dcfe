"""The CPU half of the prepared GPU check (issue #29): `scripts/gpu_wheels.sh` stages wheels, data and tokenizer
that fit one 64 MiB carry, and `scripts/gpu_check.sh` runs on a machine without CUDA, skipping its CUDA steps
cleanly and writing a summary that names each step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _sh(script, *args, env=None, timeout=600):
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PY": sys.executable, **(env or {})})


def test_gpu_wheels_stages_what_the_gpu_machine_lacks_within_one_carry(tmp_path, shared_data):
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "probe"),
                            "annotated-types"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("no package index reachable from this machine (pip download fails)")
    dest = tmp_path / "gpu"
    r = _sh("gpu_wheels.sh", str(dest), env={"EMOSCOPE_DATA": str(shared_data)})
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = sorted(p.name for p in (dest / "wheels").iterdir())
    for name in ("pydantic-", "pydantic_core-", "gguf-", "plotly-", "ruptures-", "annotated_types-"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    # the compiled ones are for the GPU machine's CPython 3.12, whatever Python runs here
    assert all("cp312" in w for w in wheels if w.startswith(("pydantic_core-", "ruptures-")))
    assert {p.name for p in (dest / "data").iterdir()} >= {"goemotions_ekman", "wikitext2"}
    assert (dest / "tokenizer" / "tokenizer.json").is_file()
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 64 * 2**20
    # bad input: one error line, exit 2, nothing half-written
    bad = _sh("gpu_wheels.sh", str(tmp_path / "nodata"), env={"EMOSCOPE_DATA": str(tmp_path / "missing")})
    assert bad.returncode == 2 and bad.stderr.startswith("error: no data folder")
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "nodata.partial").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half: on a GPU machine run the script itself")
def test_gpu_check_skips_its_cuda_steps_cleanly_without_cuda(tmp_path):
    out = tmp_path / "out"
    r = _sh("gpu_check.sh", env={"OUT": str(out), "GPU": str(tmp_path / "none")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["pytest_gpu", "quick_cuda", "scale_cuda", "sae_train_cuda"]
    assert steps["pytest_gpu"]["rc"] == 0 and summary["gpu"] is None and summary["failed"] == []
    assert all(steps[s]["rc"] is None and steps[s]["note"] == "skipped: no CUDA device"
               for s in ("quick_cuda", "scale_cuda", "sae_train_cuda"))
    log = (out / "gpu_check.log").read_text()
    assert "skipped" in log and "test_gpu.py" in log  # pytest ran the gpu tests, which skip without CUDA
    # what comes back from a device call: at most 8 files, plain names, no deeper than two folders
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.name.replace(".", "").replace("_", "").isalnum() for p in files)


def test_gpu_check_reports_a_failing_step(tmp_path):
    """A step that fails makes the check exit 1 and names it (here pytest, given a folder with no tests)."""
    out = tmp_path / "out"
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/sh\nif [ "$2" = pytest ]; then exit 3; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    r = _sh("gpu_check.sh", env={"OUT": str(out), "GPU": str(tmp_path / "none"), "PY": str(fake)})
    summary = json.loads((out / "gpu_check.json").read_text())
    assert r.returncode == 1 and summary["failed"] == ["pytest_gpu"]
    assert summary["steps"][0]["rc"] == 3
