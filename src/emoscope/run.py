"""Stage orchestration: `emoscope run --config CONFIG` runs every stage into one run directory.

A stage is skipped when its saved result carries the same config hash (so a rerun is cheap and an
interrupted run resumes); `force` names stages to rerun regardless. Stages so far: evaluate, report.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .artifacts import config_hash, read_json
from .errors import EmoscopeError
from .evaluate import EvalConfig, evaluate


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_dir: str = Field("runs/demo", description="Where every stage writes its folder and the report.")
    evaluate: EvalConfig = EvalConfig()


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise EmoscopeError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise EmoscopeError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise EmoscopeError(f"config {p}: {where}: {err['msg']}") from None


def is_current(run_dir: Path, stage: str, cfg: BaseModel) -> bool:
    f = run_dir / stage / "result.json"
    return f.exists() and read_json(f).get("config_hash") == config_hash(cfg)


def run(cfg: RunConfig, force: set[str] = frozenset(), log=print, progress_factory=None) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if "evaluate" in force or not is_current(run_dir, "evaluate", cfg.evaluate):
        log("stage evaluate: scoring")
        evaluate(cfg.evaluate, run_dir, progress=progress_factory("evaluate") if progress_factory else None)
    else:
        log("stage evaluate: up to date, skipped")
    from .report.html import write_report
    path = write_report(run_dir)
    log(f"report: {path}")
    return path
