"""Command line: `emoscope evaluate | run | report | summarize`.

Every user error (EmoscopeError) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import EmoscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mechanistic analysis of emotion inference in language models.")
console = Console(stderr=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def print_eval(res: dict, calibrated: bool = True) -> None:
    t = Table(title=f"{res['model']['name']} · {res['config']['data']['dataset']}/{res['config']['data']['split']} · "
                    f"{res['config']['shots']}-shot · n={res['n']} · seed {res['seed']}")
    t.add_column("scores")
    t.add_column("accuracy [95% CI]")
    t.add_column("macro-F1 [95% CI]")
    for name in ["raw", "calibrated"] if calibrated else ["raw"]:
        t.add_row(name, _fmt(res[name]["accuracy"]), _fmt(res[name]["macro_f1"]))
    Console().print(t)
    pc = Table(title="per-class recall (raw → calibrated)")
    pc.add_column("class")
    pc.add_column("support")
    pc.add_column("recall raw")
    pc.add_column("recall cal.")
    for lab in res["labels"]:
        pc.add_row(lab, str(res["raw"]["per_class"][lab]["support"]), f"{res['raw']['per_class'][lab]['recall']['value']:.2f}",
                   f"{res['calibrated']['per_class'][lab]['recall']['value']:.2f}")
    Console().print(pc)


@app.command()
def evaluate(
    model: str = typer.Option("gemma3-270m", help="Registry name, .gguf file, local dir or HF id."),
    dataset: str = typer.Option("goemotions_ekman", help="goemotions_ekman, isear, dair_emotion or a CSV/TSV/JSONL file."),
    split: str = typer.Option("test", help="train, dev or test."),
    per_class: Optional[int] = typer.Option(50, help="Balanced sample per class (0 = all rows)."),
    shots: int = typer.Option(0, help="Few-shot demonstrations from the train split."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Also print calibrated results (always saved)."),
    calibration: str = typer.Option("contextual", help="contextual (content-free inputs) or train (train-text prior)."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated task labels (default: the Ekman six present)."),
    extra: str = typer.Option("drop", help="Other labels of the data: drop or keep."),
    text_column: str = typer.Option("text", help="Text column for CSV/TSV/JSONL."),
    label_column: str = typer.Option("label", help="Label column for CSV/TSV/JSONL."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the dataset folders."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32", help="float32 (default), bfloat16, float16, or auto (bf16 where native)."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/evaluate/<model>-<dataset>-<split>-k<shots>)."),
):
    """Score the model on an emotion dataset: raw and calibrated accuracy and macro-F1 with 95% CIs."""
    from .evaluate import DataConfig, EvalConfig, ModelConfig, evaluate as run_eval

    cfg = _validated(EvalConfig, model=ModelConfig(name=model, device=device, dtype=dtype),
                     data=DataConfig(dataset=dataset, split=split, data_dir=data_dir, per_class=per_class or None,
                                     labels=labels.split(",") if labels else None, extra=extra,
                                     text_column=text_column, label_column=label_column),
                     shots=shots, calibration=calibration, seed=seed, batch_size=batch_size)
    safe = Path(model).name.replace(".gguf", "")
    run_dir = out or Path("runs/evaluate") / f"{safe}-{Path(dataset).stem}-{split}-k{shots}"
    with _progress() as p:
        task = p.add_task("scoring", total=None)
        res = run_eval(cfg, run_dir, progress=lambda n: p.advance(task, n))
    print_eval(res, calibrated=calibrate)
    console.print(f"wrote {run_dir / 'evaluate' / 'result.json'}")


def _validated(cls, **kw):
    from pydantic import ValidationError

    try:
        return cls(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        raise EmoscopeError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


@app.command()
def run(config: Path = typer.Option(..., help="Run config YAML (see configs/quick.yaml)."),
        force: list[str] = typer.Option([], help="Stage to rerun even if up to date (repeatable).")):
    """Run the whole pipeline into the config's run directory and write report.html."""
    from .run import load_config, run as run_all

    cfg = load_config(config)
    with _progress() as p:
        def factory(stage):
            task = p.add_task(stage, total=None)
            return lambda n: p.advance(task, n)
        path = run_all(cfg, set(force), log=console.print, progress_factory=factory)
    from .artifacts import read_json
    from .evaluate import load_result
    print_eval(load_result(cfg.run_dir))
    run_dir = Path(cfg.run_dir)
    if (run_dir / "saes" / "result.json").exists():
        print_saes(read_json(run_dir / "saes" / "result.json"))
    if (run_dir / "phases" / "result.json").exists():
        print_phases(read_json(run_dir / "phases" / "result.json"))
    for line in headlines(run_dir):
        console.print(line, markup=False)
    console.print(f"report: {path}")


def headlines(run_dir: Path) -> list[str]:
    """One line each for the tracing, steering and audit results a run directory holds."""
    from .artifacts import read_json

    out = []
    f = run_dir / "trace" / "result.json"
    if f.exists():
        tr = read_json(f)
        best = []
        for lab, e in tr["emotions"].items():
            ph = e["phases"][str(e["strongest_phase"])]
            if ph["features"]:
                top = ph["features"][0]
                best.append(f"{lab} L{top['layer']}/{top['feature']} {top['effect']['value']:.2f}")
        out.append("tracing, strongest feature per emotion (margin drop): " + ("; ".join(best) or "none"))
    f = run_dir / "steer" / "result.json"
    if f.exists():
        st = read_json(f)
        test = {m: v["test"]["macro_f1"]["value"] for m, v in st["methods"].items()}
        base = max((m for m in test if m not in ("feature_steering", "random_features")), key=test.get)
        out.append(f"steering: test macro-F1 {test['feature_steering']:.3f} vs best baseline {base} {test[base]:.3f} "
                   f"(random features {test['random_features']:.3f})")
    f = run_dir / "audit" / "result.json"
    if f.exists():
        au = read_json(f)
        out.append(f"audit: {len(au['candidates'])} candidates, over the thresholds: {', '.join(au['failed']) or 'none'}")
    return out


@app.command("train-saes")
def train_saes_cmd(
    model: str = typer.Option("gemma3-270m", help="Registry name, .gguf file, local dir or HF id."),
    profile: str = typer.Option("quick", help="quick (minutes, CI/demo) or full (research quality)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    tokens: Optional[int] = typer.Option(None, help="Override the profile's training tokens."),
    expansion: int = typer.Option(8), k: int = typer.Option(32), seed: int = typer.Option(0),
    pretrained: Optional[str] = typer.Option(None, help="Folder of SAELens-format SAEs to load and evaluate instead."),
    data_dir: Optional[str] = typer.Option(None), dtype: str = typer.Option("float32"), device: str = typer.Option("auto"),
    out: Path = typer.Option(Path("runs/saes"), help="Run directory; SAEs go to OUT/saes/<hook>/."),
):
    """Train (or load) an SAE for every requested layer and evaluate them: L0, FVU, CE-loss recovered, dead %."""
    from .models import load_model
    from .sae.stage import PROFILES, SAEStageConfig, run_saes
    from .sae.train import SAETrainConfig

    if profile not in PROFILES:
        raise EmoscopeError(f"unknown profile '{profile}': choose {', '.join(PROFILES)}")
    train = {**PROFILES[profile], "expansion": expansion, "k": k, "seed": seed}
    if tokens:
        train["tokens"] = tokens
    if layers:
        try:
            train["layers"] = [int(x) for x in layers.split(",")]
        except ValueError:
            raise EmoscopeError(f"--layers must be comma-separated integers, got '{layers}'") from None
    cfg = _validated(SAEStageConfig, train=_validated(SAETrainConfig, **train), pretrained=pretrained)
    view = load_model(model, device, dtype)
    with _progress() as p:
        task = p.add_task("training SAEs (tokens)", total=cfg.train.tokens if not pretrained else None)
        res = run_saes(cfg, out, view, data_dir, progress=lambda n: p.advance(task, n))
    print_saes(res)
    console.print(f"wrote {out / 'saes'}")


def print_saes(res: dict) -> None:
    t = Table(title=f"SAEs for {res['model']}: held-out quality by layer")
    for c in ["hook", "depth", "L0", "FVU", "CE recovered", "dead % (train)", "unseen % (held-out)"]:
        t.add_column(c)
    for h in res["hooks"]:
        q = res["quality"][h]
        ce, dead = q.get("ce_recovered"), q.get("dead_frac_train")
        t.add_row(h, f"{res['depth'][h]:.2f}", f"{q['l0']:.1f}", f"{q['fvu']:.3f}", "" if ce is None else f"{ce:.3f}",
                  "" if dead is None else f"{100 * dead:.1f}", f"{100 * q['dead_frac']:.1f}")
    Console().print(t)


@app.command()
def phases(run_dir: Path = typer.Argument(..., help="Run directory with evaluate/ and saes/ results."),
           fdr: float = typer.Option(0.05), min_auroc: float = typer.Option(0.7), n_boot: int = typer.Option(100),
           seed: int = typer.Option(0), dtype: str = typer.Option("float32"), device: str = typer.Option("auto")):
    """Layer-wise analysis: per-layer statistics, the phases, shared vs emotion-specific features."""
    from .analysis.phases_stage import PhasesConfig, run_phases
    from .artifacts import read_json
    from .models import load_model

    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run the evaluate stage first")
    cfg = _validated(PhasesConfig, fdr=fdr, min_auroc=min_auroc, n_boot=n_boot, seed=seed)
    view = load_model(read_json(f)["config"]["model"]["name"], device, dtype)
    with _progress() as p:
        task = p.add_task("layers", total=view.n_layers)
        res = run_phases(cfg, run_dir, view, progress=lambda n: p.advance(task, n))
    print_phases(res)
    console.print(f"wrote {run_dir / 'phases'}")


def print_phases(res: dict) -> None:
    b = ", ".join(f"layer {x['layer']} (depth {x['depth']:.2f}, 95% CI layers {x['lo']:.0f}-{x['hi']:.0f})" for x in res["boundaries"])
    Console().print(f"{res['model']}: {res['n_phases']} phase(s) ({' -> '.join(res['phase_names'])}); boundaries: {b or 'none'}", markup=False)
    s = res["last_phase_share"]
    Console().print(f"share of emotion-selective features in the last phase: {s['value']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] "
                    f"({s['n_boot']} subsamples)", markup=False)
    t = Table(title="emotion-selective features (final token, all examples)")
    for c in ["emotion", "specific", "shared"]:
        t.add_column(c)
    for lab in res["labels"]:
        t.add_row(lab, str(res["specific_counts"][lab]), str(res["shared_counts"][lab]))
    Console().print(t)


@app.command()
def trace(run_dir: Path = typer.Argument(..., help="Run directory with evaluate/, saes/ and phases/ results."),
          examples: str = typer.Option("correct", help="correct or all."), per_emotion: int = typer.Option(16),
          baseline: str = typer.Option("zero", help="zero or mean."), candidates: int = typer.Option(8),
          margin: str = typer.Option("best_other", help="best_other (gold minus best other label) or all_others (log-odds)."),
          n_random: int = typer.Option(20), seed: int = typer.Option(0),
          dtype: str = typer.Option("float32"), device: str = typer.Option("auto")):
    """Phase-stratified causal tracing: which SAE features cause each emotion's prediction."""
    from .analysis.trace_stage import TraceConfig, run_trace
    from .artifacts import read_json
    from .models import load_model

    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run the evaluate stage first")
    cfg = _validated(TraceConfig, examples=examples, per_emotion=per_emotion, baseline=baseline, candidates=candidates,
                     margin=margin, n_random=n_random, seed=seed)
    view = load_model(read_json(f)["config"]["model"]["name"], device, dtype)
    with _progress() as p:
        task = p.add_task("emotion x phase", total=None)
        res = run_trace(cfg, run_dir, view, progress=lambda n: p.advance(task, n))
    t = Table(title=f"causal tracing, {res['model']} (margin: {res['config'].get('margin', 'all_others')})")
    for c in ["emotion", "phase", "top effect [95% CI]", "features for 50% / 80%", "effective n", "random control"]:
        t.add_column(c)
    for lab, e in res["emotions"].items():
        for p_, r in e["phases"].items():
            top = r["features"][0]["effect"] if r["features"] else None
            t.add_row(lab, p_, "" if top is None else f"{top['value']:.2f} [{top['lo']:.2f}, {top['hi']:.2f}]",
                      f"{r['n_for_50'] or '>' + str(len(r['features']))} / {r['n_for_80'] or '>' + str(len(r['features']))}",
                      f"{r['effective_n']:.1f}", f"{r['random_control']['mean']:.2f}")
    Console().print(t)
    for lab, why in res["skipped"].items():
        console.print(f"skipped {lab}: {why}")
    console.print(f"wrote {run_dir / 'trace'}")


@app.command()
def audit(config: Path = typer.Option(..., help="Run config with an `audit:` section (candidates, thresholds)."),
          force: list[str] = typer.Option([], help="Stage to rerun even if up to date (repeatable).")):
    """Brittleness audit: compare prompt and precision candidates with the reference; exit 1 when a
    candidate breaks a threshold (accuracy drop, flip rate, causal-feature survival)."""
    from .artifacts import read_json
    from .run import load_config, run as run_all

    cfg = load_config(config)
    if "audit" not in cfg.stages:
        cfg.stages = [s for s in cfg.stages if s != "audit"] + ["audit"]
    with _progress() as p:
        def factory(stage):
            task = p.add_task(stage, total=None)
            return lambda n: p.advance(task, n)
        run_all(cfg, set(force), log=console.print, progress_factory=factory)
    res = read_json(Path(cfg.run_dir) / "audit" / "result.json")
    print_audit(res)
    if res["failed"]:
        console.print(f"audit failed: {', '.join(res['failed'])} exceed the thresholds", markup=False)
        raise typer.Exit(1)


def print_audit(res: dict) -> None:
    from .report.tables import final_excess, retained
    t = Table(title=f"brittleness audit, {res['model']}, n={res['n']}, reference accuracy {res['reference_accuracy']:.3f}")
    for c in ["candidate", "Δ accuracy [95% CI]", "flip rate", "causal survival", "effect retained [95% CI]", "final phase excess drift [95% CI]", "AUROC conf. / feature drift", "verdict"]:
        t.add_column(c)
    for r in res["candidates"]:
        d, a = r["accuracy_change"], r["detection_auroc"]
        fmt = lambda v: "—" if v is None else f"{v:.2f}"
        t.add_row(r["name"], f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", f"{r['flip_rate']:.2f}", fmt(r["causal_survival"]), retained(r),
                  final_excess(r), f"{fmt(a['confidence_drop'])} / {fmt(a['causal_feature_drift'])}",
                  "FAIL" if r["failed"] else "ok")
    Console().print(t)


@app.command("steer")
def steer_cmd(run_dir: Path = typer.Argument(..., help="Run directory with evaluate/, saes/ and trace/ results."),
              dev_per_class: int = typer.Option(32), seed: int = typer.Option(0),
              dtype: str = typer.Option("float32"), device: str = typer.Option("auto")):
    """Choose a feature steering on the dev set; compare it with baselines on test and other datasets."""
    from .analysis.steer_stage import SteerConfig, run_steer
    from .artifacts import read_json
    from .models import load_model

    f = run_dir / "evaluate" / "result.json"
    if not f.exists():
        raise EmoscopeError(f"{run_dir} has no evaluate/result.json: run the evaluate stage first")
    cfg = _validated(SteerConfig, dev_per_class=dev_per_class, seed=seed)
    view = load_model(read_json(f)["config"]["model"]["name"], device, dtype)
    with _progress() as p:
        task = p.add_task("strength search", total=None)
        res = run_steer(cfg, run_dir, view, progress=lambda n: p.advance(task, n))
    print_steer(res)
    console.print(f"wrote {run_dir / 'steer'} (steering file: {run_dir / 'steer' / 'steering.json'})")


def print_steer(res: dict) -> None:
    sets = sorted({k for m in res["methods"].values() for k in m})
    t = Table(title=f"steering, {res['model']}: macro-F1 [95% CI] (chosen: {res['chosen']['features_per_emotion']} feature(s)/emotion x {res['chosen'].get('strengths', res['chosen']['strength'])})")
    t.add_column("method")
    for s_ in sets:
        t.add_column(s_)
    for name, m in res["methods"].items():
        t.add_row(name, *[_fmt(m[s_]["macro_f1"]) if s_ in m else "" for s_ in sets])
    Console().print(t)
    se = res["side_effects"]
    Console().print(f"WikiText-2 perplexity {se['ppl_clean']:.2f} -> {se['ppl_steered_all_positions']:.2f} "
                    f"({100 * se['ppl_change']:+.1f}%) with steering at every position; KL {se['kl_all_positions']:.4f}", markup=False)


@app.command()
def classify(texts: list[str] = typer.Argument(..., help="Texts to classify."),
             run_dir: Optional[Path] = typer.Option(None, "--run", help="Run directory (task, SAEs); default: the steering file's."),
             steering: Optional[Path] = typer.Option(None, help="Steering file saved by the steer stage."),
             dtype: str = typer.Option("float32"), device: str = typer.Option("auto")):
    """Calibrated emotion probabilities for new texts, optionally with a saved steering applied."""
    from .analysis.steer import check, label_probs, load_steering
    from .artifacts import read_json
    from .evaluate import EvalConfig, Task
    from .models import load_model

    st = load_steering(steering) if steering else None
    run_dir = run_dir or (Path(st.chosen_on["run_dir"]) if st and "run_dir" in st.chosen_on else None)
    if run_dir is None or not (run_dir / "evaluate" / "result.json").exists():
        raise EmoscopeError("give --run RUN_DIR (a run with an evaluate stage) or a steering file that names one")
    ev = read_json(run_dir / "evaluate" / "result.json")
    view = load_model(ev["config"]["model"]["name"], device, dtype)
    task = Task(EvalConfig.model_validate(ev["config"]), view)
    saes = {}
    if st:
        from .capture import HookPoint
        from .sae.stage import load_saes
        saes = {HookPoint.parse(h).layer: s for h, s in load_saes(run_dir, view).items()}
        check(st, view, saes)
    probs = label_probs(view, task, texts, saes, st.edits if st else [])
    t = Table(title="calibrated label probabilities" + (f" (steering: {steering.name})" if st else ""))
    t.add_column("text")
    for lab in task.classes:
        t.add_column(lab)
    for text, p in zip(texts, probs):
        t.add_row(text[:60], *[f"{x:.2f}" for x in p])
    Console().print(t)
    print(json.dumps([{"text": x, **{lab: round(float(v), 4) for lab, v in zip(task.classes, p)}} for x, p in zip(texts, probs)]))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory.")):
    """(Re)write RUN_DIR/report.html from the saved stage results."""
    from .report.html import write_report

    console.print(f"wrote {write_report(run_dir)}")


@app.command()
def summarize(run_dirs: list[Path] = typer.Argument(..., help="Run directories with evaluate/result.json."),
              stage: str = typer.Option("evaluate", help="evaluate (one row per run), phases, trace, steer or audit.")):
    """Print markdown tables of a stage's headline numbers (evaluate: accuracy and macro-F1 over several runs)."""
    from .artifacts import read_json
    from .report.tables import TABLES, ci as c

    if stage != "evaluate":
        if stage not in TABLES:
            raise EmoscopeError(f"unknown stage '{stage}': choose evaluate, {', '.join(TABLES)}")
        for d in run_dirs:
            print(f"### {d} ({stage})\n")
            print(TABLES[stage](d) + "\n")
        return

    print("| model | dataset | shots | n | acc raw | acc calibrated | macro-F1 raw | macro-F1 calibrated |")
    print("|---|---|---|---|---|---|---|---|")
    for d in run_dirs:
        f = d / "evaluate" / "result.json"
        if not f.exists():
            raise EmoscopeError(f"{d} has no evaluate/result.json")
        r = read_json(f)
        print(f"| {r['model']['name']} | {r['config']['data']['dataset']} | {r['config']['shots']} | {r['n']} | "
              f"{c(r['raw']['accuracy'])} | {c(r['calibrated']['accuracy'])} | {c(r['raw']['macro_f1'])} | {c(r['calibrated']['macro_f1'])} |")


@app.command("config-keys")
def config_keys_cmd():
    """Print every key of a run config as a markdown table (default and meaning)."""
    from .run import config_keys

    print("| key | default | meaning |")
    print("|---|---|---|")
    for key, default, desc in config_keys():
        print(f"| `{key}` | `{default}` | {desc} |".replace("``", "none"))


def main() -> None:
    _quiet_libraries()
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit instead of raising it
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except EmoscopeError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
