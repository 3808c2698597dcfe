"""Every pipeline stage, in pipeline order: each module's `STAGE` (`base.Stage`), registered here once. The run config
(its sections and hashes), the pipeline (results, running, progress) and the CLI (commands, printers) read this."""

from __future__ import annotations

from .. import canary
from . import audit, evaluate, phases, saes, sensitivity, steer, trace
from .base import Stage

REGISTRY: dict[str, Stage] = {m.STAGE.name: m.STAGE
                               for m in (evaluate, saes, phases, trace, steer, audit, canary, sensitivity)}
"""The stages by name, in pipeline order."""
STAGES = tuple(REGISTRY)
"""Their names, in pipeline order."""
