"""What the command line prints for people: tables of each stage's headline numbers (rich), and
progress that stays readable in a terminal and in CI or cluster logs."""

from __future__ import annotations

import sys
import threading
import time
import weakref
from pathlib import Path

from rich.console import Console
from rich.table import Table

out = Console()  # results: stdout
err = Console(stderr=True)  # progress and messages: stderr


class PlainProgress:
    """Progress for logs (stderr not a terminal): a line at most every `every` seconds with the count,
    the rate and, when the total is known, the ETA; and, while the work goes on without advancing (a long
    forward, a model load), a line at least every `heartbeat` seconds from a background thread, which ends with
    `close()` or when the object is dropped."""

    def __init__(self, name: str, total: int | None = None, every: float = 10.0, stream=None,
                 heartbeat: float | None = 60.0):
        self.name, self.total, self.every, self.n = name, total, every, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.time()
        self._lock, self._closed = threading.Lock(), threading.Event()
        if heartbeat:
            threading.Thread(target=_beat, args=(weakref.ref(self), self._closed, heartbeat), daemon=True).start()

    def __call__(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.every or (self.total and self.n >= self.total):
            self._write(now)

    def _write(self, now: float, note: str = "") -> None:
        with self._lock:
            self.last = now
            self.stream.write(self.line(now) + note + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._closed.set()

    def __del__(self):
        self._closed.set()

    def line(self, now: float) -> str:
        rate = self.n / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {_duration((self.total - self.n) / rate)}"
        # slow steps (an audit candidate, a sensitivity build): time per step, where a rate would read 0.00/s
        speed = f"{rate:.2f}/s" if rate >= 0.1 or not self.n else f"{_duration(1 / rate)} each"
        return f"{self.name}: {done} done, {speed}, {_duration(now - self.start)} elapsed{eta}"


def _beat(ref, closed: threading.Event, every: float) -> None:
    """A line from the progress `ref` whenever it has been silent for `every` seconds, until it is closed."""
    while not closed.wait(min(every, 5.0) / 2):
        p = ref()
        if p is None:
            return
        now = time.time()
        if now - p.last >= every:
            p._write(now, " (working)")
        del p


def show(table: Table) -> None:
    """Print a table on stdout whole: as a grid where it fits the console's width, else (CI logs, where rich falls
    back to 80 columns, or a narrow terminal) one block per row, its first cell and its last (the name and, in the
    gates, the verdict) on the block's first line and every other column below as `column: value`, never cut."""
    if table.__rich_measure__(out, out.options).maximum <= out.width:
        out.print(table)
        return
    cols = table.columns
    cells = [[str(c) for c in col.cells] for col in cols]
    if table.title:
        out.print(str(table.title), markup=False, highlight=False, soft_wrap=True)
    for i in range(table.row_count):
        head = cells[0][i] + (f"  [{cols[-1].header}: {cells[-1][i]}]" if len(cols) > 2 else f": {cells[-1][i]}")
        out.print(head, markup=False, highlight=False, soft_wrap=True)
        for col, vals in zip(cols[1:-1], cells[1:-1]):
            out.print(f"    {col.header}: {vals[i]}", markup=False, highlight=False, soft_wrap=True)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def print_eval(res: dict, calibrated: bool = True) -> None:
    t = Table(title=f"{res['model']['name']} · {res['config']['data']['dataset']}/{res['config']['data']['split']} · "
                    f"{res['config']['shots']}-shot · n={res['n']} · seed {res['seed']}")
    t.add_column("scores")
    t.add_column("accuracy [95% CI]")
    t.add_column("macro-F1 [95% CI]")
    answers = res.get("answers")
    if answers:
        t.add_column("largest label share")
    for name in ["raw", "calibrated"] if calibrated else ["raw"]:
        share = [f"{answers[name]['largest_share']:.2f} ({answers[name]['largest']})"] if answers else []
        t.add_row(name, _fmt(res[name]["accuracy"]), _fmt(res[name]["macro_f1"]), *share)
    show(t)
    if answers and answers["raw"]["degenerate"]:
        err.print(f"warning: degenerate predictor: the model answers {answers['raw']['largest']} for "
                  f"{answers['raw']['largest_share']:.0%} of the texts; what its features explain is mostly that bias",
                  markup=False, highlight=False)
    pc = Table(title="per-class recall (raw → calibrated)")
    pc.add_column("class")
    pc.add_column("support")
    pc.add_column("recall raw")
    pc.add_column("recall cal.")
    for lab in res["labels"]:
        pc.add_row(lab, str(res["raw"]["per_class"][lab]["support"]),
                   f"{res['raw']['per_class'][lab]['recall']['value']:.2f}",
                   f"{res['calibrated']['per_class'][lab]['recall']['value']:.2f}")
    show(pc)

def headlines(run_dir: Path) -> list[str]:
    """One line each for the tracing, steering and audit results a run directory holds."""
    from ..artifacts import read_json

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
        out.append(f"audit: {len(au['candidates'])} candidates, over the thresholds: "
                   f"{', '.join(au['failed']) or 'none'}")
    return out

def print_saes(res: dict) -> None:
    t = Table(title=f"SAEs for {res['model']}: held-out quality by layer")
    for c in ["hook", "depth", "L0", "FVU", "CE recovered", "dead % (train)", "unseen % (held-out)"]:
        t.add_column(c)
    for h in res["hooks"]:
        q = res["quality"][h]
        ce, dead = q.get("ce_recovered"), q.get("dead_frac_train")
        t.add_row(h, f"{res['depth'][h]:.2f}", f"{q['l0']:.1f}", f"{q['fvu']:.3f}", "" if ce is None else f"{ce:.3f}",
                  "" if dead is None else f"{100 * dead:.1f}", f"{100 * q['dead_frac']:.1f}")
    show(t)

def print_phases(res: dict) -> None:
    b = ", ".join(f"layer {x['layer']} (depth {x['depth']:.2f}, 95% CI layers {x['lo']:.0f}-{x['hi']:.0f})"
                  for x in res["boundaries"])
    out.print(f"{res['model']}: {res['n_phases']} phase(s) ({' -> '.join(res['phase_names'])}); boundaries: "
              f"{b or 'none'}", markup=False)
    s = res["last_phase_share"]
    out.print(f"share of emotion-selective features in the last phase: {s['value']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] "
                    f"({s['n_boot']} subsamples)", markup=False)
    t = Table(title="emotion-selective features (final token, all examples)")
    for c in ["emotion", "specific", "shared"]:
        t.add_column(c)
    for lab in res["labels"]:
        t.add_row(lab, str(res["specific_counts"][lab]), str(res["shared_counts"][lab]))
    show(t)

def print_audit(res: dict) -> None:
    from .tables import final_excess, retained
    t = Table(title=f"brittleness audit, {res['model']}, n={res['n']}, reference accuracy "
                    f"{res['reference_accuracy']:.3f}")
    for c in ["candidate", "Δ accuracy [95% CI]", "flip rate", "causal survival", "effect retained [95% CI]",
              "final phase excess drift [95% CI]", "AUROC conf. / feature drift", "llama.cpp file", "verdict"]:
        t.add_column(c)
    for r in res["candidates"]:
        d, a = r["accuracy_change"], r["detection_auroc"]
        fmt = lambda v: "—" if v is None else f"{v:.2f}"
        t.add_row(r["name"], f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", f"{r['flip_rate']:.2f}",
                  fmt(r["causal_survival"]), retained(r),
                  final_excess(r), f"{fmt(a['confidence_drop'])} / {fmt(a['causal_feature_drift'])}", _build(r),
                  "FAIL" if r["failed"] else "ok")
    show(t)
    _print_blind_spots(res)
    if any(r.get("runtime") for r in res["candidates"]):
        out.print(f"llama.cpp rows ran in {next(r['runtime'] for r in res['candidates'] if r.get('runtime'))}; read "
                  "each beside llama.cpp_F32, the reference's own weights in llama.cpp (its arithmetic alone)",
                  markup=False)


def _print_blind_spots(res: dict) -> None:
    """llama-perplexity's figures beside the verdict (audit.kld set): per build, and what a Q4_K_M-level bar misses."""
    from ..analysis.blindspot import blind_spots

    spots = blind_spots(res["candidates"])
    if spots is None:
        return
    t = Table(title="the standard quality figures (llama-perplexity's KL divergence, WikiText-2) beside the verdict")
    for c in ["build", "runtime", "mean KLD ± err", "KLD 99%", "same top p", "PPL ratio", "RMS Δp", "flip rate",
              "verdict"]:
        t.add_column(c)
    rows = {r["name"]: r for r in res["candidates"]}
    for x in spots["builds"]:
        k = rows[x["name"]]["kld"]
        t.add_row(x["name"], x["runtime"], f"{k['mean_kld']:.4f} ± {k['mean_kld_err']:.4f}", f"{k['kld_99']:.3f}",
                  f"{k['same_top_p']:.3f}", f"{k['ppl_ratio']:.4f}", f"{100 * k['rms_dp']:.2f}%",
                  f"{x['flip_rate']:.2f}", "FAIL" if x["audit_failed"] else "ok")
    show(t)
    rho = spots["spearman_kld_flips"]
    out.print(f"under the Q4_K_M-level KLD bar yet failing the audit: {', '.join(spots['missed_by_kld']) or 'none'}; "
              f"over it yet passing: {', '.join(spots['false_alarms_by_kld']) or 'none'}"
              + (f"; Spearman(KLD, flips) {rho['value']:.2f} [{rho['lo']:.2f}, {rho['hi']:.2f}], n = {rho['n']}"
                 if rho else ""), markup=False)


def _build(r: dict) -> str:
    """A llama.cpp row's file type, size, KV cache and threads."""
    if not r.get("runtime"):
        return "—"
    kv = "" if r.get("kv_cache") in (None, "f16") else f", KV {r['kv_cache']}"
    return f"{r['file_type']} {r['file_bytes'] / 1e6:.0f} MB{kv}, {r['threads']} thr"


def print_sensitivity(res: dict) -> None:
    cfg = res["config"]
    t = Table(title=f"layer sensitivity to {cfg['target']} in llama.cpp, {res['model']}, n={res['n']} ('only': the "
                    f"group at {cfg['target']}, the rest F32; 'keep': the group at {cfg['high']}, the rest "
                    f"{cfg['target']})")
    for c in ["group", "phase", "only: flips", "only: Δ accuracy [95% CI]", "only: effect retained",
              "keep: flips", "keep: MB"]:
        t.add_column(c)
    rows = {(r["group"], r["direction"]): r for r in res["groups"]}
    fmt = lambda v: "—" if v is None else f"{v:.2f}"
    for g in dict.fromkeys(r["group"] for r in res["groups"]):
        o, k = rows.get((g, "only")), rows.get((g, "keep"))
        t.add_row(g, "—" if o["phase"] is None else str(o["phase"]), f"{o['flip_rate']:.2f}",
                  f"{o['accuracy_change']:+.3f} [{o['accuracy_change_lo']:+.3f}, {o['accuracy_change_hi']:+.3f}]",
                  fmt(o["effect_retained"]), "—" if k is None else f"{k['flip_rate']:.2f}",
                  "—" if k is None else f"{k['file_bytes'] / 1e6:.1f}")
    show(t)
    lp = res["last_phase_test"]
    if lp and lp.get("difference") is not None:
        out.print(f"last phase vs earlier layers ({cfg['target']} one group at a time): mean flips "
                  f"{lp['last_phase_mean_flips']:.3f} vs {lp['earlier_mean_flips']:.3f}, difference "
                  f"{lp['difference']:+.3f}, permutation p = {lp['p_value']:.3f} -> the last phase is "
                  f"{'' if lp['last_phase_fragile'] else 'not '}the fragile one", markup=False)
    print_recipe(res)


def print_canary_written(res: dict) -> None:
    """The canary stage's summary."""
    out.print(f"canary of {res['model']}: {res['n']} of the {res['n_audited']} audited examples, {res['features']} "
              f"causal features; tolerances from {', '.join(res['tolerance_from']) or 'no 8-bit candidate'}",
              markup=False)


def print_canary(res, canary) -> None:
    """One check's verdict: what the canary predicts for the whole audit set beside the audit's thresholds."""
    t, m = canary.thresholds, canary.meta
    surv = "—" if res.causal_survival is None else f"{res.causal_survival:.2f} (min {t.min_causal_survival})"
    tab = Table(title=f"canary of {m['model']}: {len(m['texts'])} examples standing for {m['n_audited']} audited, "
                      f"{len(m['features'])} causal features")
    for c in ("", "value", "threshold"):
        tab.add_column(c)
    lo, hi = res.flip_rate_interval
    from ..canary import confidence
    conf = round(100 * confidence(m))
    tab.add_row("predicted flip rate", f"{res.predicted_flip_rate:.3f} ({conf}%: {lo:.3f}-{hi:.3f})",
                f"max {t.max_flip_rate}")
    tab.add_row("predicted accuracy change", f"{res.predicted_accuracy_change:+.3f}", f"max drop {t.max_accuracy_drop}")
    tab.add_row("canary examples flipped", f"{res.canary_flips} / {len(m['texts'])}", "")
    tab.add_row("causal features still active", surv, "")
    show(tab)
    if res.out_of_band:
        out.print(f"beyond their 8-bit tolerance: {', '.join(res.out_of_band)}", markup=False)
    for why in res.template:
        out.print(f"template drift: {why}", markup=False)
    if res.unchecked:
        out.print(f"not checkable on this backend: {', '.join(res.unchecked)} (the residual stream is not readable "
                  "over HTTP; check a build in-process for them)", markup=False)
    verdict = "passed" if res.passed else f"DRIFT: {' and '.join(res.drifted)}" if res.drifted else \
        f"UNCERTAIN: {' and '.join(res.uncertain)} too close to the thresholds to call; run the full audit"
    out.print(f"{verdict} ({res.seconds:.2f} s)", markup=False)


def print_recipe(res: dict) -> None:
    r = res.get("recipe")
    if not r:
        return
    c = res["config"]
    tgt, hi = (res["uniform"][f"uniform_{c[k]}"] for k in ("target", "high"))
    mb = lambda b: f"{b / 1e6:.1f} MB"
    out.print(f"recipe ({'meets' if r['feasible'] else 'cannot meet'} max_flip_rate "
              f"{res['thresholds']['max_flip_rate']} by the additive prediction from the "
              f"{r.get('model', 'reverse')} rows): keep "
              f"{', '.join(r['keep_high']) or 'nothing'} at {c['high']}; predicted {mb(r['predicted_file_bytes'])}, "
              f"flips {r['predicted_flip_rate']:.3f} (uniform {c['target']}: {mb(r['uniform_target_bytes'])}, flips "
              f"{tgt['flip_rate']:.3f}; uniform {c['high']}: {mb(r['uniform_high_bytes'])}, flips "
              f"{hi['flip_rate']:.3f})", markup=False)
    if r.get("measured"):
        m = r["measured"]
        eff = "—" if m["effect_retained"] is None else f"{m['effect_retained']:.2f}"
        verdict = "FAIL" if m["failed"] else "passes the gate"
        out.print(f"recipe built and audited: {mb(m['file_bytes'])}, flips {m['flip_rate']:.3f}, Δ accuracy "
                  f"{m['accuracy_change']:+.3f}, effect retained {eff} -> {verdict}", markup=False)
    out.print(r["command"], markup=False, soft_wrap=True)

def print_steer(res: dict) -> None:
    sets = sorted({k for m in res["methods"].values() for k in m})
    t = Table(title=f"steering, {res['model']}: macro-F1 [95% CI] (chosen: {res['chosen']['features_per_emotion']} "
                    f"feature(s)/emotion x {res['chosen'].get('strengths', res['chosen']['strength'])})")
    t.add_column("method")
    for s_ in sets:
        t.add_column(s_)
    for name, m in res["methods"].items():
        t.add_row(name, *[_fmt(m[s_]["macro_f1"]) if s_ in m else "" for s_ in sets])
    show(t)
    se = res["side_effects"]
    out.print(f"WikiText-2 perplexity {se['ppl_clean']:.2f} -> {se['ppl_steered_all_positions']:.2f} "
              f"({100 * se['ppl_change']:+.1f}%) with steering at every position; KL {se['kl_all_positions']:.4f}",
              markup=False)


def print_trace(res: dict) -> None:
    t = Table(title=f"causal tracing, {res['model']} (margin: {res['config'].get('margin', 'all_others')})")
    for c in ["emotion", "phase", "top effect [95% CI]", "features for 50% / 80%", "effective n", "random control"]:
        t.add_column(c)
    for lab, e in res["emotions"].items():
        for p_, r in e["phases"].items():
            top = r["features"][0]["effect"] if r["features"] else None
            more = ">" + str(len(r["features"]))
            t.add_row(lab, p_, "" if top is None else f"{top['value']:.2f} [{top['lo']:.2f}, {top['hi']:.2f}]",
                      f"{r['n_for_50'] or more} / {r['n_for_80'] or more}",
                      f"{r['effective_n']:.1f}", f"{r['random_control']['mean']:.2f}")
    show(t)
    for lab, why in res["skipped"].items():
        err.print(f"skipped {lab}: {why}")
    from .tables import weak_screens
    if weak_screens(res):
        err.print(f"attribution screen flagged ({', '.join(weak_screens(res))}): validate more candidates "
                  "(trace.candidates), rank by exact ablation (trace.screen: exact) or train better SAEs", markup=False)
