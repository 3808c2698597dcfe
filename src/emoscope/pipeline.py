"""Stage orchestration: `emoscope run --config CONFIG` runs every stage into one run directory.

A stage is skipped when its saved result carries the hash of its config and of the results it reads
(so a rerun is cheap, an interrupted run resumes, and changing one key reruns only what depends on
it); `force` names stages to rerun regardless. The model, the task and the SAEs are loaded once, and
only if a stage runs. Stages: evaluate, saes, phases, trace, steer, audit, then the report.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from . import distributed as dist
from .config import RunConfig
from .data import check as check_data
from .deployment.candidates import SOURCE
from .errors import EmoscopeError
from .models import ModelConfig, ModelView, check_reference, load_model
from . import profiling
from .resources import peak_memory
from .stages.registry import REGISTRY, STAGES
from .stages.saes import CHECKPOINTS
from .stages.base import StageResult
from .task import Task, TaskConfig



class RunContext:
    """What every stage of one run shares, built once and only when needed: the model, the task, the
    SAEs (from the saes stage) and upstream results (from the run directory)."""

    def __init__(self, run_dir: str | Path, model: ModelConfig, task: TaskConfig, data_dir: str | None = None,
                 log=None, progress_factory=None):
        self.run_dir, self.model_config, self.task_config = Path(run_dir), model, task
        self.data_dir, self.progress_factory = data_dir, progress_factory
        self.log = log or (lambda message: None)  # the pipeline's log lines; silent by default (stdout may be JSON)
        self._model: ModelView | None = None
        self._task: Task | None = None
        self._results: dict[str, StageResult] = {}
        self.load_seconds = 0.0
        self.saes_device: str | None = None  # None: the model's device
        self.config: RunConfig | None = None  # the run's config, for a stage that reads another's section

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, device: str | None = None, dtype: str | None = None,
                     **kw) -> "RunContext":
        """The context of an existing run, rebuilt from its evaluate result (model and task settings)."""
        ev = cls(run_dir, ModelConfig(), TaskConfig()).result("evaluate", check_model=False)
        cfg = dict(ev["config"])
        model = ModelConfig.model_validate(cfg.pop("model"))
        model = model.model_copy(update={k: v for k, v in (("device", device), ("dtype", dtype)) if v})
        return cls(run_dir, model, TaskConfig.model_validate(cfg), **kw)

    @property
    def model(self) -> ModelView:
        if self._model is None:
            t = time.time()
            self.log(f"model {self.model_config.name}: loading")
            with dist.main_first():  # rank 0 fills the model cache (a GGUF dequantised once) for the others
                self._model = load_model(self.model_config)
            self.load_seconds = time.time() - t
        return self._model

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = Task(self.model, self.task_config)
        return self._task

    @property
    def saes(self) -> dict:
        return self.result("saes").saes

    def result(self, stage: str, check_model: bool = True) -> StageResult:
        """A finished stage's result, read from the run directory once."""
        if stage not in self._results:
            folder = self.run_dir / stage
            if not (folder / "result.json").exists():
                raise EmoscopeError(f"{self.run_dir} has no {stage}/result.json: run the {stage} stage first")
            cls = REGISTRY[stage].result
            self._results[stage] = cls.load(folder, self.model, self.saes_device) if stage == "saes" else \
                cls.load(folder)
        res = self._results[stage]
        if check_model and stage == "evaluate" and res["model"]["name"] != self.model_config.name:
            raise EmoscopeError(f"{self.run_dir} was evaluated with {res['model']['name']}, not "
                                f"{self.model_config.name}")
        return res

    def optional(self, stage: str) -> StageResult | None:
        return self.result(stage) if (self.run_dir / stage / "result.json").exists() else None

    def progress(self, stage: str, total: int | None = None):
        return self.progress_factory(stage, total) if self.progress_factory else None


def compute(ctx: RunContext, stage: str, cfg, workdir: Path | None = None) -> StageResult:
    """Run one stage on the context with its config; the result is not saved yet."""
    st = REGISTRY[stage]
    return st.run(ctx, cfg, ctx.progress(stage, st.total(ctx, cfg) if st.total else None), workdir)


def run_stage(ctx: RunContext, stage: str, cfg, key: str | None = None) -> StageResult:
    """Compute a stage and save it into the run directory (atomically), filed under `key` when given."""
    for need in REGISTRY[stage].needs:
        ctx.result(need)  # one line naming a missing upstream stage, before any work
    work = ctx.run_dir / f".{stage}.work"
    if dist.is_main():
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    try:
        t0 = time.time()
        with peak_memory() as mem, profiling.collect() as prof:
            res = compute(ctx, stage, cfg, workdir=work)
        res.timing = {**(res.timing or {}), "stage_seconds": round(time.time() - t0, 2), **mem, "profile": prof}
        if dist.world_size() > 1:
            res.timing["ranks"] = dist.world_size()
        if key is not None:
            res.data["config_hash"] = key
        if dist.is_main():  # every rank holds the same result; one writes it
            res.save(ctx.run_dir / REGISTRY[stage].path(cfg))
            if stage == "saes":
                shutil.rmtree(ctx.run_dir / CHECKPOINTS, ignore_errors=True)  # saved: no longer needed
        dist.barrier()
    finally:
        if dist.is_main():
            shutil.rmtree(work, ignore_errors=True)
    ctx._results.pop(stage, None)  # later stages read what was saved
    return res


def is_current(run_dir: Path, stage: str, cfg: RunConfig) -> bool:
    f = run_dir / REGISTRY[stage].path(cfg.stage_config(stage)) / "result.json"
    try:
        return f.exists() and json.loads(f.read_text()).get("config_hash") == cfg.stage_hash(stage)
    except (json.JSONDecodeError, OSError, AttributeError):
        return False  # an unreadable result is rerun, not trusted


def run(cfg: RunConfig, force: set[str] = frozenset(), log=print, progress_factory=None) -> Path:
    """Every configured stage in order, skipping those that are up to date; then the report."""
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise EmoscopeError(f"--force {unknown[0]}: unknown stage; choose from {', '.join(STAGES)}")
    preflight(cfg)
    run_dir = Path(cfg.run_dir).expanduser()
    _make_dir(run_dir)
    dist.init(cfg.model.device)  # with several ranks (torchrun): join them; rank 0 alone logs and writes
    log = _tee(log, run_dir / "run.log") if dist.is_main() else (lambda msg: None)
    ctx = RunContext(run_dir, cfg.model, cfg.stage_config("evaluate"), cfg.data_dir, log,
                     progress_factory if dist.is_main() else None)
    ctx.saes_device, ctx.config = cfg.saes.device, cfg
    with main_lock(run_dir, log), traceback_into(run_dir / "run.log"):
        if dist.world_size() > 1:
            log(f"data parallel: {dist.world_size()} ranks ({dist.backend()})")
        if "evaluate" in cfg.stages and ("evaluate" in force or not is_current(run_dir, "evaluate", cfg)):
            check_data(ctx.task_config.data)  # bad data fails before the model is loaded
        for stage in [s for s in STAGES if s in cfg.stages]:
            if stage not in force and is_current(run_dir, stage, cfg):
                log(f"stage {stage}: up to date, skipped")
                if stage == "saes" and dist.is_main():  # a checkpoint left by a killed run of other settings
                    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
                continue
            log(f"stage {stage}: running")
            run_stage(ctx, stage, cfg.stage_config(stage), key=cfg.stage_hash(stage))
        from .report.html import write_report
        path = write_report(run_dir) if dist.is_main() else run_dir / "report.html"
    log(f"report: {path}")
    return path


def preflight(cfg: RunConfig) -> None:
    """Every model a run will load, checked before the run directory is touched: the reference and each audit
    candidate's own file (a bad reference otherwise surfaces only after earlier stages have run)."""
    check_reference(cfg.model.name, "model.name")
    if "audit" in cfg.stages and cfg.audit.candidates != "default":  # the defaults load no file
        for cand in cfg.audit.candidates:
            if cand.model not in (None, SOURCE):
                check_reference(cand.model, f"audit candidate '{cand.name}': model")


def _make_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise EmoscopeError(f"run directory {run_dir} is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EmoscopeError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise EmoscopeError(f"run directory {run_dir} is not writable")


@contextmanager
def main_lock(run_dir: Path, log=print):
    """The run directory's lock, held by rank 0 for all ranks (the others wait until it has it)."""
    if not dist.is_main():
        dist.barrier()
        yield
        return
    with run_lock(run_dir, log):
        dist.barrier()
        yield


@contextmanager
def run_lock(run_dir: Path, log=print):
    """One process at a time per run directory: `.lock` holds the owner's process id and host. A lock
    left by a process that is gone (killed) is taken over with a note; a live one refuses the run."""
    f, me = run_dir / ".lock", {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = _lock_holder(f)
            if holder is not None and (holder.get("host") != me["host"] or _alive(holder.get("pid"))):
                raise EmoscopeError(f"run directory {run_dir} is in use by process {holder.get('pid')} on "
                                    f"{holder.get('host')}; wait for it, or delete {f} if that run is gone") from None
            log(f"taking over the lock of a run that is gone ({f}: {holder})")
            f.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as h:
        json.dump(me, h)
    try:
        yield
    finally:
        f.unlink(missing_ok=True)


def _lock_holder(f: Path) -> dict | None:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # unreadable or half-written: its writer died between creating and filling it


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


@contextmanager
def traceback_into(log_file: Path):
    """An unexpected exception (a bug, not bad input) leaves its traceback in the run's log, and the
    exception knows where, so the command line can point there in one line."""
    try:
        yield
    except (EmoscopeError, KeyboardInterrupt):
        raise
    except Exception as e:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} internal error:\n{traceback.format_exc()}")
        e.emoscope_log = str(log_file)
        raise


def _tee(log, path: Path):
    """Log to the caller and, time-stamped, to run_dir/run.log."""
    def both(msg: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        log(msg)
    return both
