"""Stage orchestration: `emoscope run --config CONFIG` runs every stage into one run directory.

A stage is skipped when its saved result carries the hash of its config and of the results it reads
(so a rerun is cheap, an interrupted run resumes, and changing one key reruns only what depends on
it); `force` names stages to rerun regardless. The model is loaded once, and only if a stage runs.
Stages: evaluate, saes, phases, trace, steer, audit, then the report.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .artifacts import config_hash, read_json
from .errors import EmoscopeError
from .evaluate import EvalConfig, ModelConfig, evaluate
from .analysis.phases_stage import PhasesConfig, run_phases
from .analysis.audit import AuditConfig, run_audit
from .analysis.steer_stage import SteerConfig, run_steer
from .analysis.trace_stage import TraceConfig, run_trace
from .sae.stage import SAEStageConfig, run_saes

STAGES = ("evaluate", "saes", "phases", "trace", "steer", "audit")
UPSTREAM = {"evaluate": (), "saes": (), "phases": ("evaluate", "saes"), "trace": ("phases",), "steer": ("trace",),
            "audit": ("phases", "trace")}


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    run_dir: str = Field("runs/demo", description="Where every stage writes its folder and the report.")
    model: ModelConfig = Field(ModelConfig(), description="The model every stage analyses.")
    data_dir: str | None = Field(None, description="Folder holding the dataset folders (else $EMOSCOPE_DATA, ../shared/data).")
    stages: list[str] = Field(["evaluate", "saes", "phases"], description="Stages to run, in pipeline order (evaluate, saes, phases, trace, steer, audit).")
    evaluate: EvalConfig = EvalConfig()
    saes: SAEStageConfig = SAEStageConfig()
    phases: PhasesConfig = PhasesConfig()
    trace: TraceConfig = TraceConfig()
    steer: SteerConfig = SteerConfig()
    audit: AuditConfig = AuditConfig()

    def stage_config(self, stage: str):
        """The stage's config as it is hashed and run: shared keys (model, data_dir) filled in."""
        if stage == "evaluate":
            ev = self.evaluate.model_copy(deep=True)
            ev.model = self.model
            if self.data_dir:
                ev.data.data_dir = self.data_dir
            return ev
        return getattr(self, stage)


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise EmoscopeError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise EmoscopeError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(raw.get("evaluate"), dict) and "model" in raw["evaluate"]:
        raise EmoscopeError(f"config {p}: set the model once, at the top level (model:), not under evaluate")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise EmoscopeError(f"config {p}: {where}: {err['msg']}") from None
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise EmoscopeError(f"config {p}: unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    return cfg


def stage_hash(cfg: RunConfig, stage: str) -> str:
    """Hash of a stage's config and of everything it reads: the model, the data, upstream stages."""
    if stage == "evaluate":
        return config_hash(cfg.stage_config("evaluate"))
    upstream = [stage_hash(cfg, s) for s in UPSTREAM[stage]]
    return config_hash(cfg.stage_config(stage), cfg.model, cfg.data_dir, upstream)


def is_current(run_dir: Path, stage: str, cfg: RunConfig) -> bool:
    f = run_dir / stage / "result.json"
    return f.exists() and read_json(f).get("config_hash") == stage_hash(cfg, stage)


def run(cfg: RunConfig, force: set[str] = frozenset(), log=print, progress_factory=None) -> Path:
    from .models import load_model

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _tee(log, run_dir / "run.log")
    view = None
    for stage in [s for s in STAGES if s in cfg.stages]:
        if stage not in force and is_current(run_dir, stage, cfg):
            log(f"stage {stage}: up to date, skipped")
            continue
        log(f"stage {stage}: running")
        if view is None:
            m = cfg.model
            view = load_model(m.name, m.device, m.dtype, m.trust_remote_code)
        prog = progress_factory(stage) if progress_factory else None
        if stage == "evaluate":
            evaluate(cfg.stage_config("evaluate"), run_dir, view=view, progress=prog)
        elif stage == "saes":
            run_saes(cfg.saes, run_dir, view, cfg.data_dir, progress=prog, log=log, key=stage_hash(cfg, "saes"))
        elif stage == "phases":
            run_phases(cfg.phases, run_dir, view, key=stage_hash(cfg, "phases"), progress=prog)
        elif stage == "trace":
            run_trace(cfg.trace, run_dir, view, key=stage_hash(cfg, "trace"), progress=prog)
        elif stage == "steer":
            run_steer(cfg.steer, run_dir, view, key=stage_hash(cfg, "steer"), progress=prog)
        elif stage == "audit":
            m = cfg.model
            fresh = lambda name=None: load_model(name or m.name, m.device, "float32", m.trust_remote_code)
            run_audit(cfg.audit, run_dir, view, fresh, key=stage_hash(cfg, "audit"), progress=prog)
    from .report.html import write_report
    path = write_report(run_dir)
    log(f"report: {path}")
    return path


def _tee(log, path: Path):
    """Log to the caller and, time-stamped, to run_dir/run.log."""
    import time

    def both(msg: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        log(msg)
    return both


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key of the run config, for the docs."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if key == "evaluate.model":
            continue  # the run config's top-level model is used
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_keys(ann, key + ".")
        else:
            default = field.default
            out.append((key, "" if default is None else json_default(default), field.description or ""))
    return out


def json_default(v) -> str:
    import json
    return json.dumps(v) if not isinstance(v, str) else v
