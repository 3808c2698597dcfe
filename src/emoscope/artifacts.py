"""Run-directory artifacts: each stage writes `run_dir/<stage>/` atomically, with its config hash.

A stage writes everything into a temporary sibling folder and renames it into place at the end, so
an interrupted run never leaves a half-written stage that could be read as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel


def config_hash(*parts) -> str:
    """Stable hash of configs (pydantic models or plain JSON-able values)."""
    blobs = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(blobs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def stage_dir(run_dir: str | Path, stage: str):
    """Yield a temporary folder; on success it replaces `run_dir/<stage>` in one rename."""
    final = Path(run_dir) / stage
    final.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of a killed run (SIGKILL skips the cleanup below): never read, removed here
    for stale in [*final.parent.glob(f".{stage}.tmp-*"), *final.parent.glob(f".{stage}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{stage}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{stage}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def require(run_dir: str | Path, *stages: str) -> None:
    """One-line error unless each named stage has a result in the run directory."""
    from .errors import EmoscopeError

    for stage in stages:
        if not (Path(run_dir) / stage / "result.json").exists():
            raise EmoscopeError(f"{run_dir} has no {stage}/result.json: run the {stage} stage first")
