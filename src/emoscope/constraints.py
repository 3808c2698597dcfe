"""Constrained types shared by every config, so the CLI, YAML files and the Python API validate a
setting the same way, where it enters, before any expensive work."""

from __future__ import annotations

import math
import os
from typing import Annotated

from pydantic import AfterValidator, Field


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _machine_threads(v: int) -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if v > n:
        raise ValueError(f"{v} threads is more than the {n} CPU{'s' if n != 1 else ''} this process may use")
    return v


def _name(v: str) -> str:
    if not v.strip() or any(c in v for c in "/\\\0"):
        raise ValueError(f"'{v}' is not a name: it must be non-empty, without / or \\ (it names files)")
    return v


Seed = Annotated[int, Field(ge=0)]
"""A random seed: a non-negative integer."""
Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]
"""cpu, cuda, cuda:N, mps or auto."""
Finite = Annotated[float, AfterValidator(_finite)]
"""A finite float (no nan, no inf)."""
Positive = Annotated[int, Field(ge=1)]
"""An integer >= 1."""
NonNegative = Annotated[float, Field(ge=0), AfterValidator(_finite)]
"""A finite float >= 0."""
Threads = Annotated[int, Field(ge=1), AfterValidator(_machine_threads)]
"""CPU threads: at least 1 and at most the CPUs this process may run on (more only starves the machine)."""
Name = Annotated[str, AfterValidator(_name)]
"""A name for tables and file names: non-empty, no path separators."""
Share = Annotated[float, Field(ge=0, le=1)]
"""A share or rate: a float in [0, 1]."""
MapDevice = Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^(cpu|disk|mps|cuda(:\d+)?)$")]
"""Where a device_map puts a module: a GPU index (0, 1, ...), cuda:N, cpu, mps or disk."""


def unique_names(items, what: str):
    """Refuses two items with the same `.name` (results are keyed by name)."""
    seen = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what}: the name '{item.name}' twice; names must be unique")
        seen.add(item.name)
    return items
