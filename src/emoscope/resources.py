"""Peak memory of a block of work: resident CPU memory of this process and allocated GPU memory.

On Linux the kernel keeps the peak resident set (VmHWM) and lets a process reset it (writing 5 to
/proc/self/clear_refs), so the CPU figure is exact, not sampled. CUDA's allocator keeps its own peak.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


@contextmanager
def peak_memory():
    """Yields a dict filled on exit: `cpu_peak_gb` (peak resident memory of the process during the
    block; since process start where the peak cannot be reset, flagged by `cpu_peak_since_start`) and,
    with CUDA, `gpu_peak_gb` (peak allocated by PyTorch during the block)."""
    out: dict = {}
    since_start = not _reset_cpu_peak()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        out["cpu_peak_gb"] = round(_cpu_peak_bytes() / GIB, 3)
        if since_start:
            out["cpu_peak_since_start"] = True
        if cuda:
            torch.cuda.synchronize()
            out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
