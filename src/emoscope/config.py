"""The run config: one pydantic model composed of each stage's config, the one source of every default.

The command line, YAML files, profiles and the docs all derive from it: `--set key=value` overrides
any dotted key, SAE profiles are overlays on it, and `emoscope config-keys` / `docs/config.md` are
generated from its fields.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from .artifacts import config_hash
from .errors import EmoscopeError, validated
from .canary import CanaryConfig
from .models import ModelConfig
from .stages.audit import AuditConfig
from .stages.phases import PhasesConfig
from .stages.saes import SAEStageConfig
from .stages.sensitivity import SensitivityConfig
from .stages.steer import SteerConfig
from .stages.trace import TraceConfig
from .task import TaskConfig
from .stages.registry import REGISTRY, STAGES



class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)
    run_dir: str = "runs/demo"
    """Where every stage writes its folder and the report."""
    model: ModelConfig = ModelConfig()
    """The model every stage analyses."""
    data_dir: str | None = None
    """Folder holding the dataset folders (else $EMOSCOPE_DATA, ../shared/data)."""
    stages: list[str] = ["evaluate", "saes", "phases"]
    """Stages to run, in pipeline order (evaluate, saes, phases, trace, steer, audit, canary, sensitivity)."""
    evaluate: TaskConfig = TaskConfig()
    saes: SAEStageConfig = SAEStageConfig()
    phases: PhasesConfig = PhasesConfig()
    trace: TraceConfig = TraceConfig()
    steer: SteerConfig = SteerConfig()
    audit: AuditConfig = AuditConfig()
    sensitivity: SensitivityConfig = SensitivityConfig()
    """`emoscope sensitivity`: the llama.cpp type under test, the kept type and the layer groups (its options
    override these)."""
    canary: CanaryConfig = CanaryConfig()
    """`emoscope canary write`: how many audited examples, and the tolerances and confidence of a check."""

    @model_validator(mode="after")
    def _backend_stages(self):
        torch_only = [s for s in self.stages if s != "evaluate"]
        if self.model.backend == "llama.cpp" and torch_only:
            raise ValueError(f"stages {', '.join(torch_only)} read and edit the model in PyTorch: run them with "
                             "backend transformers, and audit llama.cpp builds as candidates (runtime: llama.cpp)")
        return self

    def stage_config(self, stage: str):
        """The stage's config as it is hashed and run: the run's data_dir filled into the task's data."""
        if stage == "evaluate":
            ev = self.evaluate.model_copy(deep=True)
            if self.data_dir:
                ev.data.data_dir = self.data_dir
            return ev
        return getattr(self, stage)

    def stage_hash(self, stage: str) -> str:
        """Hash of a stage's config and of everything it reads: the model, the data, upstream stages."""
        if stage == "evaluate":
            return config_hash({"model": self.model.model_dump(mode="json"),
                                **self.stage_config("evaluate").model_dump(mode="json")})
        upstream = [self.stage_hash(s) for s in REGISTRY[stage].upstream]
        return config_hash(self.stage_config(stage), self.model, self.data_dir, upstream)


def shipped_configs() -> list[str]:
    folder = resources.files("emoscope").joinpath("configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve(path: str | Path) -> Path:
    """A config file: the path itself, or the name of one shipped with emoscope (quick, full, ...)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = resources.files("emoscope").joinpath("configs", f"{path}.yaml")
    if "/" not in str(path) and shipped.is_file():
        return Path(str(shipped))
    raise EmoscopeError(f"config file not found: {p} (shipped configs: {', '.join(shipped_configs())})")


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A run config from YAML (a path or a shipped name) with `key=value` overrides applied."""
    p = resolve(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise EmoscopeError(f"config {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise EmoscopeError(f"config {p} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise EmoscopeError(f"cannot read config {p}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise EmoscopeError(f"config {p} must be a mapping of keys, not a {type(raw).__name__}")
    if not raw:
        raise EmoscopeError(f"config {p} is empty: name at least the stages to run (every key: docs/config.md)")
    raw = apply_overrides(raw, overrides)
    if isinstance(raw.get("evaluate"), dict) and "model" in raw["evaluate"]:
        raise EmoscopeError(f"config {p}: set the model once, at the top level (model:), not under evaluate")
    cfg = validated(RunConfig, raw, f"config {p}: ")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise EmoscopeError(f"config {p}: unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value read as YAML: numbers, lists, null) set into a nested dict."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EmoscopeError(f"--set takes key=value, got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise EmoscopeError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = parsed
    return out


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key of the run config, for the docs."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_keys(ann, key + ".")
        else:
            default = field.default
            desc = " ".join((field.description or "").split())
            out.append((key, "" if default is None else json_default(default), desc))
    return out


def json_default(v) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    return json.dumps(v) if not isinstance(v, str) else v


def config_doc() -> str:
    """docs/config.md: every key of the run config with its default and meaning, generated."""
    lines = ["# Run config keys", "",
             "Generated by `emoscope config-keys` from the pydantic config (`emoscope.config.RunConfig`); a test",
             "fails when this file disagrees with the code. Set any key in a YAML config or with",
             "`--set key=value` on the command line.", "", "| key | default | meaning |", "|---|---|---|"]
    for key, default, desc in config_keys():
        d = default.replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| `{key}` | {'`' + d + '`' if d else 'none'} | {desc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
