"""emoscope: mechanistic analysis of emotion inference in language models.

A notebook session, top to bottom (each step returns a typed result with `.to_frame()`, `.save(dir)`
and `.load(dir)`):

    import emoscope as es
    model = es.load_model("gemma3-270m")                 # or any HF id / local dir / .gguf file
    task = es.Task(model, dataset="goemotions_ekman", per_class=20)
    task.predict(["I can't believe you did that!"])      # DataFrame: label probabilities, prediction
    ev = es.evaluate(task)                               # accuracy, macro-F1 with 95% intervals
    saes = es.train_saes(model, layers=[6, 12]).saes     # or es.load_saes(folder / run dir / release)
    ph = es.phases(task, saes, ev)                       # per-layer statistics, phases, features
    tr = es.trace(task, saes, ev, ph)                    # causal features per emotion and phase
    st = es.steer(task, saes, ev, tr)                    # dev-chosen steering vs baselines
    au = es.audit(task, saes, ev, ph, tr)                # prompt / precision / runtime brittleness
    se = es.sensitivity(task, saes, ev, ph, tr)          # which layers llama.cpp's Q4_K_M breaks, and a recipe
    es.canary.write(task, saes, ev, au, ph, tr).save("canary")   # then, in a serving process:
    es.canary.check(es.load_model("model.gguf", backend="llama.cpp"), "canary").passed

`es.run(config)` runs all of it into a resumable run directory with an HTML report, as
`emoscope run --config quick` does; `es.compare([run_dir, ...])` gives the paper's claims across runs.
"""

from .errors import EmoscopeError
from .models import ModelConfig, ModelView, load_model
from .data import DataConfig, Example, load_split
from .task import Task, TaskConfig, Template
from .sae import SAE, SAEConfig
from .sae.pretrained import load_saes
from .stages.base import Estimate, StageResult
from .stages.evaluate import EvalResult, evaluate
from .stages.saes import SAEStageConfig, SAEsResult, train_saes
from .stages.phases import PhasesConfig, PhasesResult, phases
from .stages.trace import TraceConfig, TraceResult, trace
from .stages.steer import SteerConfig, SteerResult, steer
from .stages.audit import AuditConfig, AuditResult, Candidate, audit
from .interventions.edits import Edit, apply_edits
from .interventions.steering import Steering, label_probs, load_steering, save_steering
from .config import RunConfig, load_config
from .pipeline import run
from .report.compare import Comparison, compare
from .stages.sensitivity import SensitivityConfig, SensitivityResult, sensitivity
from . import canary

__version__ = "0.2.0"

__all__ = [
    "load_model", "ModelConfig", "ModelView", "DataConfig", "Example", "load_split",
    "Task", "TaskConfig", "Template", "evaluate", "EvalResult",
    "train_saes", "load_saes", "SAE", "SAEConfig", "SAEStageConfig", "SAEsResult",
    "phases", "PhasesConfig", "PhasesResult", "trace", "TraceConfig", "TraceResult",
    "steer", "SteerConfig", "SteerResult", "Steering", "Edit", "apply_edits", "label_probs", "load_steering",
    "save_steering", "audit", "AuditConfig", "AuditResult", "Candidate",
    "sensitivity", "SensitivityConfig", "SensitivityResult", "canary",
    "RunConfig", "load_config", "run", "compare", "Comparison",
    "Estimate", "StageResult", "EmoscopeError", "__version__",
]
