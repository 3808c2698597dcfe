"""Constrained types shared by every config, so the CLI, YAML files and the Python API validate a
setting the same way, where it enters, before any expensive work."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, Field


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
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
