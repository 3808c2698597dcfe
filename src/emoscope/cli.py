"""Command line: a thin layer over the Python API (`import emoscope as es`).

Commands: run (the whole pipeline from a config), evaluate, train-saes, phases, trace, steer, audit,
sensitivity, canary write / check, classify, report, summarize, compare, config-keys. Every option's
default lives in the pydantic configs: options left unset keep the config's value, and `--set key=value`
reaches any key.

Exit codes: 0 success; 1 an audit over its thresholds, a canary that drifted, or an internal error (the
traceback is saved and its path printed); 2 bad input or usage (one `error:` line on stderr; a bare command group
prints its usage there); 130 interrupted.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Optional, get_args, get_origin

import typer

from .errors import EmoscopeError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Mechanistic analysis of emotion inference in language models.")

SET_HELP = "Set any config key, e.g. --set trace.per_emotion=8 (repeatable; values read as YAML)."
JSON_HELP = "Print the result as JSON on stdout (and nothing else there)."
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: as the run was evaluated)."
DTYPE_HELP = "float32, bfloat16, float16 or auto (default: as the run was evaluated)."


def _version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"emoscope {__version__}")
        raise typer.Exit()


def _usage_without_command(ctx: typer.Context) -> None:
    """A command group called without a command: its usage on stderr, exit 2 (a usage error; stdout stays empty)."""
    if ctx.invoked_subcommand is None:
        from contextlib import redirect_stdout
        with redirect_stdout(sys.stderr):  # typer's rich help prints itself to stdout
            text = ctx.get_help()
        if text:
            typer.echo(text, err=True)
        raise typer.Exit(2)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                           help="Print the version and exit.")):
    """Mechanistic analysis of emotion inference in language models."""
    _usage_without_command(ctx)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # transformers imports torchao whenever it is installed: its CUDA-only extensions fail to load on a CPU
    # machine (harmless) and torch warns about its enums; neither is the user's business
    for name in ("torchao", "torch.utils._pytree", "optimum.quanto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _progress_factory(stack):
    """Progress per stage: a rich bar on a terminal, plain periodic lines (rate, ETA) in logs."""
    from .report.console import PlainProgress, err

    if not err.is_terminal:
        return lambda name, total=None: PlainProgress(name, total)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                       TimeElapsedColumn(), console=err, transient=True))
    def factory(name, total=None):
        task = bar.add_task(name, total=total)
        return lambda n=1: bar.advance(task, n)
    return factory


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _help(cls, field: str, extra: str = "") -> str:
    f = cls.model_fields[field]
    d = f.default.model_dump(mode="json") if hasattr(f.default, "model_dump") else f.default
    from rich.markup import escape  # option help is rich markup: a docstring's [llamacpp] would vanish

    return escape(f"{' '.join((f.description or '').split())}{extra} (config default: {json.dumps(d)})")


# ------------------------------------------------------------------------------------------ run
@app.command()
def run(config: str = typer.Option(..., help="Run config: a YAML path or a shipped name (quick, full, full-smollm2)."),
        force: list[str] = typer.Option([], help="Stage to rerun even if up to date (repeatable)."),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP)):
    """Run the whole pipeline into the config's run directory and write report.html."""
    from contextlib import ExitStack

    from .config import load_config
    from .pipeline import run as run_all
    from .report.console import err, headlines, print_eval, print_phases, print_saes

    from . import distributed as dist

    cfg = load_config(config, set_)
    with ExitStack() as stack:
        factory = _progress_factory(stack) if dist.env_rank() == 0 else None
        path = run_all(cfg, set(force), log=lambda m: err.print(m, markup=False, highlight=False),
                       progress_factory=factory)
    dist.shutdown()
    if dist.env_rank() != 0:  # under torchrun, rank 0 alone reports
        return
    from .artifacts import read_json

    run_dir = Path(cfg.run_dir).expanduser()
    for stage, show in (("evaluate", print_eval), ("saes", print_saes), ("phases", print_phases)):
        if (run_dir / stage / "result.json").exists():
            show(read_json(run_dir / stage / "result.json"))
    for line in headlines(run_dir):
        err.print(line, markup=False)
    err.print(f"report: {path}", markup=False)


# ------------------------------------------------------------------------------------------ evaluate
from .data import DataConfig  # noqa: E402  (for option help text, read from the configs)
from .models import ModelConfig  # noqa: E402
from .backends.llamacpp import KV_TYPES  # noqa: E402
from .task.task import TaskConfig  # noqa: E402
from .stages.sensitivity import SensitivityConfig  # noqa: E402
from .canary import CanaryConfig  # noqa: E402


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help=_help(ModelConfig, "name")),
    dataset: Optional[str] = typer.Option(None, help=_help(DataConfig, "dataset")),
    split: Optional[str] = typer.Option(None, help=_help(DataConfig, "split")),
    per_class: Optional[int] = typer.Option(None, help=_help(DataConfig, "per_class", " 0 = every row.")),
    shots: Optional[int] = typer.Option(None, help=_help(TaskConfig, "shots")),
    calibration: Optional[str] = typer.Option(None, help=_help(TaskConfig, "calibration")),
    labels: Optional[str] = typer.Option(None, help="Comma-separated task labels (default: the Ekman six present)."),
    extra: Optional[str] = typer.Option(None, help=_help(DataConfig, "extra")),
    text_column: Optional[str] = typer.Option(None, help=_help(DataConfig, "text_column")),
    label_column: Optional[str] = typer.Option(None, help=_help(DataConfig, "label_column")),
    data_dir: Optional[str] = typer.Option(None, help=_help(DataConfig, "data_dir")),
    device: Optional[str] = typer.Option(None, help=_help(ModelConfig, "device")),
    dtype: Optional[str] = typer.Option(None, help=_help(ModelConfig, "dtype")),
    backend: Optional[str] = typer.Option(None, help=_help(ModelConfig, "backend")),
    endpoint: Optional[str] = typer.Option(None, help="A serving URL instead of --model (backend endpoint)."),
    timeout: Optional[float] = typer.Option(None, help=_help(ModelConfig, "timeout")),
    threads: Optional[int] = typer.Option(None, help=_help(ModelConfig, "threads")),
    kv_cache: Optional[str] = typer.Option(None, help=_help(ModelConfig, "kv_cache")),
    seed: Optional[int] = typer.Option(None, help=_help(TaskConfig, "seed")),
    batch_size: Optional[int] = typer.Option(None, help=_help(TaskConfig, "batch_size")),
    calibrate: bool = typer.Option(False, "--calibrate", help="Also print calibrated results (always saved)."),
    set_: list[str] = typer.Option([], "--set", help="Set a task key, e.g. --set template.instruction=... "
                                                     "(repeatable; values read as YAML)."),
    out: Optional[Path] = typer.Option(
        None, help="Run directory (default runs/evaluate/<model>-<dataset>-<split>-k<shots>)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Score the model on an emotion dataset: raw and calibrated accuracy and macro-F1 with 95% CIs."""
    from contextlib import ExitStack

    from .config import apply_overrides
    from .data import check as check_data
    from .errors import validated
    from .models import load_model
    from .report.console import err, print_eval
    from .stages.evaluate import evaluate as run_eval
    from .task import Task

    flat = {"dataset": dataset, "split": split, "shots": shots, "calibration": calibration, "extra": extra,
            "text_column": text_column, "label_column": label_column, "data_dir": data_dir, "seed": seed,
            "batch_size": batch_size, "labels": labels.split(",") if labels is not None else None}
    settings = {k: v for k, v in flat.items() if v is not None}
    if per_class is not None:
        settings["per_class"] = per_class or None  # 0: every row
    task_cfg = TaskConfig.build(apply_overrides({}, set_), **settings)
    if endpoint is not None and (model is not None or backend not in (None, "endpoint")):
        raise EmoscopeError("--endpoint is the model: give it without --model and --backend")
    given = (("name", endpoint or model), ("device", device), ("dtype", dtype),
             ("backend", "endpoint" if endpoint else backend), ("threads", threads), ("kv_cache", kv_cache),
             ("timeout", timeout))
    mcfg = validated(ModelConfig, {k: v for k, v in given if v is not None}, "model.")
    check_data(task_cfg.data)  # before the model: bad data fails in a second, not after a load
    view = load_model(mcfg)
    task = Task(view, task_cfg)
    with ExitStack() as stack:
        res = run_eval(task, progress=_progress_factory(stack)("scoring"))
    d = task.config.data
    safe = Path(mcfg.name).name.replace(".gguf", "")
    if mcfg.backend == "endpoint":  # http://host:port -> endpoint-host-port
        safe = "endpoint-" + "".join(c if c.isalnum() or c in "._" else "-" for c in mcfg.name.split("://", 1)[1])
    run_dir = out or Path("runs/evaluate") / f"{safe}-{Path(str(d.dataset)).stem}-{d.split}-k{task.config.shots}"
    res.save(Path(run_dir).expanduser() / "evaluate")
    if as_json:
        return _print_json(res.data)
    print_eval(res.data, calibrated=calibrate)
    err.print(f"wrote {Path(run_dir) / 'evaluate' / 'result.json'}", markup=False)


# ------------------------------------------------------------------------------------------ train-saes
@app.command("train-saes")
def train_saes_cmd(
    model: Optional[str] = typer.Option(None, help=_help(ModelConfig, "name")),
    profile: str = typer.Option("quick", help="quick (minutes, CI/demo) or full (research quality): overlays on the "
                                              "training config."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    pretrained: Optional[str] = typer.Option(None, help="Folder of SAELens-format SAEs (or a run directory) to load "
                                                        "and evaluate instead."),
    data_dir: Optional[str] = typer.Option(None, help=_help(DataConfig, "data_dir")),
    device: Optional[str] = typer.Option(None, help=_help(ModelConfig, "device")),
    dtype: Optional[str] = typer.Option(None, help=_help(ModelConfig, "dtype")),
    set_: list[str] = typer.Option([], "--set", help="Set an SAE stage key, e.g. --set train.tokens=300000 or "
                                                     "--set train.k=64 (repeatable)."),
    out: Path = typer.Option(Path("runs/saes"), help="Run directory; SAEs go to OUT/saes/<hook>/."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Train (or load) an SAE for every requested layer and evaluate them: L0, FVU, CE-loss recovered, dead %."""
    from contextlib import ExitStack

    from .config import apply_overrides
    from .errors import validated
    from .models import load_model
    from .report.console import err, print_saes
    from .stages.saes import PROFILES, train_saes

    if profile not in PROFILES:
        raise EmoscopeError(f"unknown profile '{profile}': choose {', '.join(PROFILES)}")
    train = {}
    if layers is not None:
        try:
            train["layers"] = [int(x) for x in layers.split(",")]
        except ValueError:
            raise EmoscopeError(f"--layers must be comma-separated integers, got '{layers}'") from None
    base = apply_overrides({"pretrained": pretrained} if pretrained else {}, set_)
    view = load_model(validated(ModelConfig, {k: v for k, v in (("name", model), ("device", device), ("dtype", dtype))
                                              if v is not None}, "model."))
    with ExitStack() as stack:
        res = train_saes(view, base, data_dir, _progress_factory(stack)("training SAEs (tokens)"), profile=profile,
                         **train)
    res.save(out.expanduser() / "saes")
    if as_json:
        return _print_json(res.data)
    print_saes(res.data)
    err.print(f"wrote {out / 'saes'}", markup=False)


# ------------------------------------------------------------------------------------------ stage commands
def _scalar_type(ann):
    """The CLI type of a config field, or None when it is not a plain scalar (lists, mappings, models)."""
    if get_origin(ann) is not None and type(None) in get_args(ann):
        ann = next(a for a in get_args(ann) if a is not type(None))
    if getattr(ann, "__name__", "") == "Literal" or str(get_origin(ann)) == "typing.Literal":
        return str
    return ann if ann in (int, float, str, bool) else None


def _stage_command(stage: str, cfg_cls, doc: str) -> None:
    """`emoscope STAGE RUN_DIR [--field value]... [--set key=value]`: one option per scalar config field,
    its help and default from the config, unset options keeping the config's value."""
    fields = {n: t for n, f in cfg_cls.model_fields.items() if (t := _scalar_type(f.annotation)) is not None}
    params = [inspect.Parameter("run_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                default=typer.Argument(..., help="Run directory with the stages this one reads."))]
    for name, t in fields.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[t],
                                        default=typer.Option(None, "--" + name.replace("_", "-"),
                                                             help=_help(cfg_cls, name))))
    params += [inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                                 default=typer.Option([], "--set", help=f"Set any {stage} key (repeatable).")),
               inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                 default=typer.Option(None, help=DEVICE_HELP)),
               inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                 default=typer.Option(None, help=DTYPE_HELP)),
               inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, "--json", help=JSON_HELP))]

    def command(**kw):
        from .config import apply_overrides
        from .errors import validated

        given = {n: kw[n] for n in fields if kw[n] is not None}
        cfg = validated(cfg_cls, apply_overrides(given, kw["set_"]), f"{stage}.")
        _run_one(stage, cfg, kw["run_dir"], kw["device"], kw["dtype"], kw["as_json"])

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    app.command(stage)(command)


def _run_one(stage: str, cfg, run_dir: Path, device, dtype, as_json: bool) -> None:
    from contextlib import ExitStack

    from .pipeline import RunContext, run_lock, run_stage, traceback_into
    from .report import console
    from .stages.registry import REGISTRY

    with ExitStack() as stack:
        factory = _progress_factory(stack)
        ctx = RunContext.from_run_dir(run_dir.expanduser(), device, dtype, log=lambda m: None,
                                      progress_factory=factory)
        with run_lock(ctx.run_dir), traceback_into(ctx.run_dir / "run.log"):
            res = run_stage(ctx, stage, cfg)
    if as_json:
        return _print_json(res.data)
    getattr(console, REGISTRY[stage].printer)(res.data)
    console.err.print(f"wrote {run_dir / stage}", markup=False)


def _register_stage_commands() -> None:
    """A command per registered stage without one of its own (evaluate, train-saes, audit, sensitivity, canary write
    have theirs)."""
    from .stages.registry import REGISTRY

    for st in REGISTRY.values():
        if st.name not in ("evaluate", "saes", "audit", "sensitivity", "canary"):
            _stage_command(st.name, st.config, st.summary)


_register_stage_commands()


@app.command()
def audit(config: str = typer.Option(..., help="Run config with an `audit:` section (candidates, thresholds)."),
          force: list[str] = typer.Option([], help="Stage to rerun even if up to date (repeatable)."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Brittleness audit: compare prompt and precision candidates with the reference; exit 1 when a
    candidate breaks a threshold (accuracy drop, flip rate, causal-feature survival, effect retained)."""
    from contextlib import ExitStack

    from .artifacts import read_json
    from .config import load_config
    from .pipeline import run as run_all
    from .report.console import err, print_audit

    cfg = load_config(config, set_)
    if "audit" not in cfg.stages:
        cfg.stages = [s for s in cfg.stages if s != "audit"] + ["audit"]
    with ExitStack() as stack:
        factory = _progress_factory(stack)
        run_all(cfg, set(force), log=lambda m: err.print(m, markup=False), progress_factory=factory)
    res = read_json(Path(cfg.run_dir).expanduser() / "audit" / "result.json")
    if as_json:
        _print_json(res)
    else:
        print_audit(res)
    if res["failed"]:
        err.print(f"audit failed: {', '.join(res['failed'])} exceed the thresholds", markup=False)
        if not as_json:
            _print_remedies(res, config, set_, Path(cfg.run_dir).expanduser())
        raise typer.Exit(1)


def _print_remedies(res: dict, config: str, set_: list[str], run_dir: Path) -> None:
    """For each failing llama.cpp type: the stored recipe of `emoscope sensitivity`, or the command that makes one."""
    from .artifacts import read_json
    from .report.console import err, print_recipe

    types = [c["changed"]["precision"].split(":", 1)[1] for c in res["candidates"]
             if c["failed"] and c["changed"].get("precision", "").startswith("llama.cpp:")]
    sets = "".join(f" --set {s}" for s in set_)
    for t in dict.fromkeys(types):
        stored = run_dir / "sensitivity" / t / "result.json"
        if stored.is_file():
            err.print(f"{t}: the mixed-precision recipe measured for it ({stored}):", markup=False)
            print_recipe(read_json(stored))
        else:
            err.print(f"{t}: which layers it breaks and a mixed-precision file that passes: "
                      f"emoscope sensitivity --config {config}{sets} --target {t}", markup=False, soft_wrap=True)


@app.command()
def sensitivity(config: str = typer.Option(..., help="Run config with an audit stage (its thresholds gate the "
                                                    "recipe); the reference must come from a GGUF file."),
                target: Optional[str] = typer.Option(None, help=_help(SensitivityConfig, "target")),
                high: Optional[str] = typer.Option(None, help=_help(SensitivityConfig, "high")),
                group_size: Optional[int] = typer.Option(None, help=_help(SensitivityConfig, "group_size")),
                threads: Optional[int] = typer.Option(None, help=_help(SensitivityConfig, "threads")),
                verify: Optional[bool] = typer.Option(None, "--verify/--no-verify",
                                                      help=_help(SensitivityConfig, "verify")),
                set_: list[str] = typer.Option([], "--set", help=SET_HELP),
                as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Layer sensitivity to a llama.cpp type, in llama.cpp, and the smallest mixed-precision file predicted to pass
    the audit's thresholds (built and audited): RUN_DIR/sensitivity/TARGET/ (result.json, sensitivity.html); the
    sensitivity stage of the run, resumed when up to date."""
    from contextlib import ExitStack

    from .config import load_config
    from .errors import validated
    from .models import gguf_source
    from .pipeline import run as run_all
    from .report import sensitivity as plot
    from .report.console import err, print_sensitivity
    from .stages import sensitivity as sens

    cfg = load_config(config, set_)
    given = {"target": target, "high": high, "group_size": group_size, "threads": threads, "verify": verify}
    scfg = validated(SensitivityConfig, {**cfg.sensitivity.model_dump(),
                                         **{k: v for k, v in given.items() if v is not None}}, "sensitivity.")
    # everything the command needs is checked before a stage resumes or a file is opened for writing
    if "audit" not in cfg.stages:
        raise EmoscopeError(f"sensitivity gates its recipe by the audit's thresholds, and config {config} has no "
                            "audit stage: add audit to its stages (or run `emoscope audit` with it first)")
    if gguf_source(cfg.model.name) is None:
        raise EmoscopeError(f"sensitivity builds llama.cpp files from the reference's GGUF, and '{cfg.model.name}' is "
                            "not a GGUF file or a registry model")
    sens.llamacpp.version()  # the extra is there, or one line naming its install
    cfg.stages = [s for s in ("evaluate", "saes", "phases", "trace") if s in cfg.stages or s == "evaluate"]
    cfg.stages.append("sensitivity")
    cfg.sensitivity = scfg
    with ExitStack() as stack:
        run_all(cfg, set(), log=lambda m: err.print(m, markup=False), progress_factory=_progress_factory(stack))
    folder = Path(cfg.run_dir).expanduser() / sens.STAGE.path(scfg)
    res = sens.SensitivityResult.load(folder)
    plot.write(res.data, folder / "sensitivity.html")
    if as_json:
        return _print_json(res.data)
    print_sensitivity(res.data)
    err.print(f"wrote {folder / 'result.json'} and {folder / 'sensitivity.html'}", markup=False)


canary_app = typer.Typer(help="A few audited examples that tell in seconds whether a build still infers emotions as "
                              "the audited reference does.")
app.add_typer(canary_app, name="canary")
canary_app.callback(invoke_without_command=True)(_usage_without_command)


@canary_app.command("write")
def canary_write(config: str = typer.Option(..., help="Run config with an `audit:` section (audited, or resumed)."),
                 n: Optional[int] = typer.Option(None, help=_help(CanaryConfig, "n")),
                 out_dir: Optional[Path] = typer.Option(None, "--out", help="Canary folder (default: RUN_DIR/canary)."),
                 set_: list[str] = typer.Option([], "--set", help=SET_HELP)):
    """Write a canary from the run's audit: examples, reference answers, causal features and 8-bit tolerances."""
    from contextlib import ExitStack

    from . import canary as canary_mod
    from .config import load_config
    from .errors import validated
    from .pipeline import run as run_all
    from .report.console import err

    cfg = load_config(config, set_)
    ccfg = validated(CanaryConfig, {**cfg.canary.model_dump(), **({"n": n} if n is not None else {})}, "canary.")
    if out_dir is not None:  # checked before the pipeline resumes or writes anything
        canary_mod.check_out(out_dir)
    cfg.stages = [s for s in ("evaluate", "saes", "phases", "trace") if s in cfg.stages or s == "evaluate"]
    cfg.stages += ["audit", "canary"]  # the canary stage of the run, resumed when up to date
    cfg.canary = ccfg
    run_dir = Path(cfg.run_dir).expanduser()
    with ExitStack() as stack:
        run_all(cfg, set(), log=lambda m: err.print(m, markup=False), progress_factory=_progress_factory(stack))
    canary = canary_mod.Canary.load(run_dir / "canary")
    folder = canary.save(out_dir) if out_dir is not None else run_dir / "canary"
    err.print(f"wrote {folder} ({len(canary.meta['texts'])} examples, {len(canary.meta['features'])} causal features; "
              f"tolerances from {', '.join(canary.meta['tolerance_from']) or 'no 8-bit candidate'})", markup=False)


@canary_app.command("check")
def canary_check(canary: Path = typer.Argument(..., help="Canary folder (from `emoscope canary write`)."),
                 model: Optional[str] = typer.Option(None, help="The build: a .gguf file, an HF id or a local model "
                                                                "folder (or --endpoint)."),
                 endpoint: Optional[str] = typer.Option(None, help="The build as served: a llama-server's URL, e.g. "
                                                                   "http://127.0.0.1:8080 (label half only)."),
                 timeout: Optional[float] = typer.Option(None, help=_help(ModelConfig, "timeout")),
                 runtime: str = typer.Option("transformers", "--backend", "--runtime",
                                             help="The build's backend: transformers or llama.cpp."),
                 kv_cache: Optional[str] = typer.Option(None, help=f"llama.cpp KV-cache type: {', '.join(KV_TYPES)}."),
                 threads: Optional[int] = typer.Option(None, help="llama.cpp threads (unset: every core)."),
                 template: Optional[str] = typer.Option(None, help="Another prompt template, as YAML, e.g. "
                                                                   "'{instruction: \"Which emotion? {options}.\"}'."),
                 device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
                 as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Run a canary on a build: exit 0 when it holds the audit's thresholds, 1 on drift (naming labels, features
    or both) or when the labels are too close to a threshold to call, 2 on bad input."""
    import yaml

    from . import canary as canary_mod
    from .errors import validated
    from .models import ModelConfig, load_model
    from .report.console import err, print_canary
    from .task.prompts import Template

    c = canary_mod.Canary.load(canary)
    tmpl = None
    if template is not None:
        try:
            tmpl = validated(Template, yaml.safe_load(template) or {}, "--template ")
        except yaml.YAMLError as e:
            raise EmoscopeError(f"--template is not YAML: {str(e).splitlines()[0]}") from None
    if (model is None) == (endpoint is None):
        raise EmoscopeError("give the build as --model FILE or as --endpoint URL (one of them)")
    settings = {"name": model, "backend": runtime, "kv_cache": kv_cache, "threads": threads}
    if endpoint is not None:
        settings = {"name": endpoint, "backend": "endpoint", **({"timeout": timeout} if timeout else {})}
    if device:
        settings["device"] = device
    view = load_model(validated(ModelConfig, settings, "model."))
    res = canary_mod.check(view, c, tmpl)
    if as_json:
        _print_json(res.to_dict())
    else:
        print_canary(res, c)
    if not res.passed:
        err.print(f"canary: {' and '.join(res.drifted)} drifted" if res.drifted else
                  f"canary: {' and '.join(res.uncertain)} uncertain (the predicted flip rate's interval crosses a "
                  f"threshold): run the full audit", markup=False)
        raise typer.Exit(1)


@app.command()
def classify(texts: Optional[list[str]] = typer.Argument(None, help="Texts to classify (or --file)."),
             file: Optional[str] = typer.Option(None, "--file", help="Texts from a file, - for stdin: one per line, "
                                                                     "or JSONL objects with a \"text\" field."),
             run_dir: Optional[Path] = typer.Option(None, "--run", help="Run directory (task, SAEs); default: the "
                                                                      "steering file's."),
             steering: Optional[Path] = typer.Option(None, help="Steering file saved by the steer stage."),
             max_tokens: int = typer.Option(4096, min=1, help="Longest text, in tokens: a longer one is refused "
                                                              "(a forward over it would take minutes on a CPU)."),
             device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
             dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Calibrated emotion probabilities for new texts, optionally with a saved steering applied."""
    from rich.table import Table

    from .interventions.steering import check, label_probs, load_steering
    from .pipeline import RunContext
    from .report.console import show

    texts = list(texts or []) + (_read_texts(file) if file is not None else [])
    if not texts:
        raise EmoscopeError("no texts: give them as arguments or with --file PATH (- for stdin)")
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise EmoscopeError(f"text {empty[0]} of {len(texts)} is empty: nothing to classify")
    st = load_steering(steering) if steering else None
    run_dir = run_dir or (Path(st.chosen_on["run_dir"]) if st and st.chosen_on.get("run_dir") else None)
    if run_dir is None or not (run_dir / "evaluate" / "result.json").exists():
        raise EmoscopeError("give --run RUN_DIR (a run with an evaluate stage) or a steering file that names one")
    ctx = RunContext.from_run_dir(run_dir, device, dtype)
    lengths = [len(ids) for ids in ctx.model.tokenizer(texts, add_special_tokens=False).input_ids]
    long = next((i for i, n in enumerate(lengths) if n > max_tokens), None)
    if long is not None:
        raise EmoscopeError(f"text {long + 1} of {len(texts)} is {lengths[long]:,} tokens, over --max-tokens "
                            f"{max_tokens:,}: shorten it or raise the limit")
    saes = {}
    if st:
        saes = ctx.result("saes").by_layer()
        check(st, ctx.model, saes)
    probs = label_probs(ctx.task, texts, saes, st.edits if st else [])
    rows = [{"text": x, **{lab: round(float(v), 4) for lab, v in zip(ctx.task.classes, p)}} for x,
            p in zip(texts, probs)]
    if as_json:
        return _print_json(rows)
    t = Table(title="calibrated label probabilities" + (f" (steering: {steering.name})" if st else ""))
    t.add_column("text")
    for lab in ctx.task.classes:
        t.add_column(lab)
    for text, p in zip(texts, probs):
        t.add_row(text[:60], *[f"{x:.2f}" for x in p])
    show(t)


def _read_texts(source: str) -> list[str]:
    """Texts from a file or stdin (-): JSONL objects with a "text" field when every line is one, else one per line
    (blank lines skipped)."""
    try:
        raw = sys.stdin.read() if source == "-" else Path(source).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EmoscopeError(f"--file {source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EmoscopeError(f"--file {source}: cannot read it ({e.strerror})") from None
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    try:
        rows = [json.loads(ln) for ln in lines]
    except json.JSONDecodeError:
        return lines
    if rows and all(isinstance(r, dict) for r in rows):
        if not all(isinstance(r.get("text"), str) for r in rows):
            bad = next(i for i, r in enumerate(rows) if not isinstance(r.get("text"), str))
            raise EmoscopeError(f"--file {source}: JSONL line {bad + 1} has no \"text\" string")
        return [r["text"] for r in rows]
    return lines


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory.")):
    """(Re)write RUN_DIR/report.html from the saved stage results."""
    from .report.console import err
    from .report.html import write_report

    err.print(f"wrote {write_report(run_dir)}", markup=False)


@app.command()
def summarize(run_dirs: list[Path] = typer.Argument(..., help="Run directories with evaluate/result.json."),
              stage: str = typer.Option("evaluate", help="evaluate (one row per run), phases, trace, steer or audit.")):
    """Print markdown tables of a stage's headline numbers (evaluate: accuracy and macro-F1 over several runs)."""
    from .artifacts import reading
    from .report.tables import TABLES, evaluate_table

    if stage == "evaluate":
        with reading(", ".join(map(str, run_dirs))):
            print(evaluate_table(run_dirs))
        return
    if stage not in TABLES:
        raise EmoscopeError(f"unknown stage '{stage}': choose evaluate, {', '.join(TABLES)}")
    for d in run_dirs:
        with reading(d):
            table = TABLES[stage](d)
        print(f"### {d} ({stage})\n\n{table}\n")


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="Run directories (one per model x dataset)."),
            out: Path = typer.Option(Path("compare.html"), help="HTML page to write (its .json beside it)."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """The paper's claims across runs: a verdict per claim and run, with the number, interval and n behind it."""
    from .report.compare import compare as claims_matrix

    c = claims_matrix(run_dirs)
    path = c.save(out)
    if as_json:
        _print_json(c.to_dict())
    else:
        print(c.to_markdown())
        print(f"\nwrote {path} and {path.with_suffix('.json')}")


@app.command("config-keys")
def config_keys_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Print every key of a run config with its default and meaning (the source of docs/config.md)."""
    from .config import config_doc, config_keys

    if as_json:
        return _print_json([{"key": k, "default": d, "meaning": m} for k, d, m in config_keys()])
    print(config_doc(), end="")


# ------------------------------------------------------------------------------------------ error boundary
def _click_exceptions():
    """click's exception classes, and typer's bundled copies of them where typer vendors click."""
    import click.exceptions as cx

    mods = [cx]
    try:
        from typer._click import exceptions as tx  # typer >= 0.2x bundles its own click
        mods.append(tx)
    except ImportError:
        pass
    return {name: tuple(getattr(m, name) for m in mods if hasattr(m, name))
            for name in ("Exit", "Abort", "NoArgsIsHelpError", "UsageError", "ClickException")}


def _internal_error(e: BaseException) -> int:
    """One line for a bug, pointing at its saved traceback (the run's log, else a temporary file)."""
    log = getattr(e, "emoscope_log", None)
    where = f"; traceback in {log}" if log else ""
    if log is None:
        try:
            path = Path(tempfile.gettempdir()) / f"emoscope-error-{os.getpid()}.log"
            path.write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            where = f"; traceback in {path}"
        except OSError:
            pass
    print(f"error: internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){where}",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    ex = _click_exceptions()
    try:
        rc = app(args=argv, standalone_mode=False)  # returns the code of a typer.Exit instead of raising it
        sys.exit(rc if isinstance(rc, int) else 0)
    except EmoscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, *ex["Abort"]):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ex["Exit"] as e:
        sys.exit(e.exit_code)
    except ex["NoArgsIsHelpError"]:  # typer has printed the help
        sys.exit(2)
    except ex["UsageError"] as e:
        if e.ctx is not None:
            print(e.ctx.get_usage(), file=sys.stderr)
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except ex["ClickException"] as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as e:  # a bug: one line and the saved traceback
        sys.exit(_internal_error(e))


if __name__ == "__main__":
    main()
