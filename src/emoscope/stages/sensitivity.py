"""Which layers' quantization breaks emotion inference, and the smallest mixed-precision build that passes the gate.
`sensitivity(task, saes, evaluation, phases, trace, config, audit_config)` returns a `SensitivityResult`.

Measured in llama.cpp on the audit's examples against the reference, each candidate a file llama.cpp's own
quantizer builds from the reference's F32 GGUF, tensor by tensor (`llama-quantize --tensor-type`):
- forward: one group of layers (or the embeddings) at the target type, every other tensor at F32;
- reverse: one group at the high type, every other tensor at the target type;
each group's tensors getting the type llama.cpp's uniform file of that type gives them (its mixture: Q4_K_M keeps
some tensors at Q6_K). Every candidate is an audit row: flips, accuracy change with its interval, causal survival
and effect retained. The recipe is the cheapest set of groups to keep high whose additive prediction meets the flip
threshold (`analysis.recipe`), under two models: from the uniform target file minus each reverse row's gain, and
from the uniform high file plus each forward row's loss (damage spread thin over many layers shows only in the
second). Its file is then built and audited, and predicted and measured are reported side by side.
The seed's claim that the last phase is the fragile one is tested on the forward rows: the last phase's mean flip
rate minus the earlier layers', with a permutation p-value over layers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..backends import gguf_build, llamacpp
from ..backends.base import require
from ..analysis.recipe import cheapest
from ..artifacts import config_hash
from ..constraints import Seed, Threads
from ..errors import EmoscopeError, validated
from ..models import gguf_source
from ..deployment.candidates import PARITY, Candidate
from ..deployment.reference import Reference
from .audit import AuditConfig, attach_parity, compare
from .base import Stage, StageResult


class SensitivityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    target: str = "Q4_K_M"
    """llama.cpp type under test (Q4_K_M, Q4_0, Q2_K, ...): a group's tensors get the types its uniform file gives."""
    high: str = "Q8_0"
    """Type of a group kept at high precision, in the reverse measurement and the recipe."""
    group_size: int = Field(1, ge=1)
    """Consecutive layers per group (the embeddings are one group of their own)."""
    reverse: bool = True
    """Also measure each group kept high with the rest at the target type (the recipe needs it)."""
    verify: bool = True
    """Build the recipe's file and audit it (predicted against measured)."""
    threads: Threads | None = Field(None)
    """llama.cpp threads (unset: every core)."""
    n_perm: int = Field(10000, ge=100)
    """Permutations of the last-phase test."""
    seed: Seed = 0
    """Seed of the permutation test."""

    @field_validator("target", "high")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            return gguf_build.check_type(v, floats=False)
        except EmoscopeError as e:
            raise ValueError(str(e)) from None


class SensitivityResult(StageResult):
    """One row per group and direction (`to_frame()`), the last-phase test and the recipe."""

    stage = "sensitivity"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.data["groups"])

    @property
    def recipe(self) -> dict:
        return self.data["recipe"]


def groups_of(types: dict[str, str], n_layers: int, size: int) -> list[tuple[str, list[str]]]:
    """(label, tensor names) per group: consecutive layers `size` at a time, then the tensors outside any layer
    (token embedding, output) that the target quantizes."""
    out = []
    for start in range(0, n_layers, size):
        layers = range(start, min(start + size, n_layers))
        names = [n for n in types if any(n.startswith(f"blk.{i}.") for i in layers)]
        out.append((f"{layers[0]}" if size == 1 else f"{layers[0]}-{layers[-1]}", names))
    rest = [n for n, t in types.items() if not n.startswith("blk.") and t not in ("F32", "F16")]
    if rest:
        out.append(("embeddings", rest))
    return out


def sensitivity(task, saes: dict, evaluation, phases=None, trace=None, config: SensitivityConfig | dict | None = None,
                audit_config: AuditConfig | dict | None = None, progress=None) -> SensitivityResult:
    """Forward and reverse rows for every group, the last-phase test, and the recipe (built and audited)."""
    cfg = config if isinstance(config, SensitivityConfig) else validated(SensitivityConfig, config or {},
                                                                         "sensitivity.")
    require(task.model, "sensitivity")
    base_audit = audit_config if isinstance(audit_config, AuditConfig) else validated(AuditConfig, audit_config or {},
                                                                                      "audit.")
    f32 = _float_gguf(task.model)
    files: dict[str, Path | Callable[[], Path]] = {f"uniform_{t}": gguf_build.quantize(f32, t, cfg.threads)
                                                   for t in (cfg.target, cfg.high)}
    target, high = (gguf_build.tensor_types(files[f"uniform_{t}"]) for t in (cfg.target, cfg.high))
    floats = {n: "F32" for n in target}
    groups = groups_of(target, task.model.n_layers, cfg.group_size)
    for label, names in groups:
        files[f"only_{label}"] = partial(gguf_build.build, f32, {**floats, **{n: target[n] for n in names}},
                                         cfg.threads)
        if cfg.reverse:
            files[f"keep_{label}"] = partial(gguf_build.build, f32, {**target, **{n: high[n] for n in names}},
                                             cfg.threads)
    # the reference once, for every file; the groups' files are many, so their KL divergence (audit.kld) is left to
    # the audit's uniform rows
    base_audit = base_audit.model_copy(update={"kld": None})
    ref = Reference.measure(task, saes, evaluation, phases, trace, base_audit)
    rows = _audit_files(files, cfg.threads, progress, ref)
    n = int(len(evaluation.predictions))
    table = _group_rows(groups, rows, phases, cfg)
    recipe = _recipe(groups, rows, target, high, cfg, base_audit, n) if cfg.reverse else None
    if recipe is not None and cfg.verify:
        built = gguf_build.build(f32, recipe["types"], cfg.threads)
        cand = Candidate(name="recipe", runtime="llama.cpp", model=str(built), threads=cfg.threads)
        recipe["measured"] = _summary(compare(cand, ref))  # its parity row is the one measured above
        if progress:
            progress(1)
    view = task.model
    data = {"stage": "sensitivity", "config_hash": config_hash(cfg, base_audit.thresholds, view.name),
            "config": cfg.model_dump(mode="json"), "thresholds": base_audit.thresholds.model_dump(mode="json"),
            "model": view.name, "n": n, "runtime": llamacpp.version(),
            "uniform": {k: _summary(rows[k]) for k in files if k.startswith("uniform_")},
            "groups": table, "last_phase_test": _last_phase_test(table, cfg), "recipe": recipe}
    return SensitivityResult(data)


def _float_gguf(view) -> Path:
    name = view.settings.name if view.settings is not None else view.name
    source = gguf_source(name)
    if source is None:
        raise EmoscopeError(f"sensitivity builds llama.cpp files from the reference's GGUF, and '{name}' is not a GGUF "
                            "file or a registry model")
    return gguf_build.write_float_gguf(source[0])


def _audit_files(files: dict[str, Path | Callable[[], Path]], threads, progress, ref: Reference) -> dict:
    """The parity row, then each file audited in llama.cpp against the one reference; rows by name. A file given as
    a function is built when its turn comes and removed once audited (the files given as paths stay): with every
    other tensor at F32 a group's file of a 1.5B model is 6 GB, and a disk holds few of them at once."""
    rows = {PARITY: compare(Candidate(name=PARITY, runtime="llama.cpp", threads=threads), ref)}
    if progress:
        progress(1)
    kept = {f for f in files.values() if isinstance(f, Path)}
    for name, f in files.items():
        path = f if isinstance(f, Path) else f()
        rows[name] = compare(Candidate(name=name, runtime="llama.cpp", model=str(path), threads=threads), ref)
        if path not in kept:
            path.unlink(missing_ok=True)
        if progress:
            progress(1)
    attach_parity(list(rows.values()))
    return rows


def _summary(row: dict) -> dict:
    eff = row["causal_effect"] or {}
    ch = row["accuracy_change"]
    return {"flip_rate": row["flip_rate"], "accuracy_change": ch["value"], "accuracy_change_lo": ch["lo"],
            "accuracy_change_hi": ch["hi"], "causal_survival": row["causal_survival"],
            "effect_retained": eff.get("value"), "effect_retained_lo": eff.get("lo"),
            "effect_retained_hi": eff.get("hi"), "file_bytes": row["file_bytes"], "failed": row["failed"]}


def _group_rows(groups, rows: dict, phases, cfg: SensitivityConfig) -> list[dict]:
    phase_of = phases.phase_of_layer if phases is not None else {}
    out = []
    for label, _ in groups:
        first = None if label == "embeddings" else int(label.split("-")[0])
        for direction in ("only", "keep"):
            key = f"{direction}_{label}"
            if key in rows:
                out.append({"group": label, "direction": direction, "first_layer": first,
                            "phase": None if first is None else int(phase_of.get(first, 0)), **_summary(rows[key])})
    return out


def _last_phase_test(table: list[dict], cfg: SensitivityConfig) -> dict | None:
    """Mean forward flip rate of last-phase layer groups minus the earlier ones', and a permutation p-value."""
    fwd = [r for r in table if r["direction"] == "only" and r["phase"] is not None]
    if not fwd:
        return None
    last = max(r["phase"] for r in fwd)
    flips = np.array([r["flip_rate"] for r in fwd])
    is_last = np.array([r["phase"] == last for r in fwd])
    if is_last.all() or not is_last.any():
        return {"n_phases": last + 1, "difference": None, "p_value": None, "note": "one phase only"}
    diff = float(flips[is_last].mean() - flips[~is_last].mean())
    rng = np.random.default_rng(cfg.seed)
    perm = np.array([(lambda m: flips[m].mean() - flips[~m].mean())(rng.permutation(is_last))
                     for _ in range(cfg.n_perm)])
    return {"n_phases": last + 1, "last_phase_mean_flips": float(flips[is_last].mean()),
            "earlier_mean_flips": float(flips[~is_last].mean()), "difference": diff,
            "p_value": float((1 + (perm >= diff).sum()) / (1 + cfg.n_perm)), "n_groups": int(len(fwd)),
            "last_phase_fragile": bool(diff > 0 and (1 + (perm >= diff).sum()) / (1 + cfg.n_perm) < 0.05)}


def _predictions(groups, rows: dict, cfg: SensitivityConfig, n: int) -> dict:
    """(base flips, gain per group kept high) under each additive model:
    - reverse: from the uniform target file, keeping group g high removes target - keep_g flips;
    - forward: from the uniform high file, putting group g at the target adds only_g - parity flips (its rows
      have the rest at F32, not at the high type), so keeping g high saves that many of the all-target sum."""
    flips = lambda key: round(rows[key]["flip_rate"] * n)
    base = flips(f"uniform_{cfg.target}")
    out = {"reverse": (base, [base - flips(f"keep_{label}") for label, _ in groups])}
    floor = flips(PARITY) if PARITY in rows else 0
    loss = [max(0, flips(f"only_{label}") - floor) for label, _ in groups]
    out["forward"] = (flips(f"uniform_{cfg.high}") + sum(loss), loss)
    return out


def _recipe(groups, rows: dict, target: dict, high: dict, cfg: SensitivityConfig, audit_cfg: AuditConfig,
            n: int) -> dict:
    """The cheapest keep-high set under each additive model; the recipe is the smallest file predicted to pass
    (or, when none is, the lowest predicted flips), the other model's choice kept beside it."""
    base_row = rows[f"uniform_{cfg.target}"]
    cost = [rows[f"keep_{label}"]["file_bytes"] - base_row["file_bytes"] for label, _ in groups]
    allowed = int(np.floor(audit_cfg.thresholds.max_flip_rate * n + 1e-9))
    found = {m: cheapest(base, gain, cost, allowed) for m, (base, gain) in _predictions(groups, rows, cfg, n).items()}
    model = min(found, key=lambda m: (not found[m].feasible,
                                      found[m].added_bytes if found[m].feasible else found[m].predicted_flips))
    r = found[model]
    kept = [groups[i] for i in r.keep]
    types = dict(target)
    for _, names in kept:
        types.update({name: high[name] for name in names})
    overrides = [f"{name}={high[name].lower()}" for _, names in kept for name in names if high[name] != target[name]]
    others = {m: {"keep_high": [groups[i][0] for i in o.keep], "feasible": o.feasible,
                  "predicted_flip_rate": o.predicted_flips / n,
                  "predicted_file_bytes": int(base_row["file_bytes"] + o.added_bytes)} for m, o in found.items()}
    return {"keep_high": [label for label, _ in kept], "feasible": r.feasible, "model": model, "by_model": others,
            "types": types, "llama_quantize_overrides": overrides, "predicted_flip_rate": r.predicted_flips / n,
            "predicted_file_bytes": int(base_row["file_bytes"] + r.added_bytes),
            "uniform_target_bytes": base_row["file_bytes"],
            "uniform_high_bytes": rows[f"uniform_{cfg.high}"]["file_bytes"],
            "command": f"llama-quantize {' '.join('--tensor-type ' + o for o in overrides)} MODEL-F32.gguf OUT.gguf "
                       f"{cfg.target}"}


def _run(ctx, cfg: SensitivityConfig, progress, workdir) -> SensitivityResult:
    return sensitivity(ctx.task, ctx.saes, ctx.result("evaluate"), ctx.optional("phases"), ctx.optional("trace"), cfg,
                       ctx.config.audit, progress=progress)


STAGE = Stage("sensitivity", SensitivityConfig, SensitivityResult, upstream=("audit",), needs=("evaluate", "saes"),
              run=_run, printer="print_sensitivity", folder=lambda cfg: f"sensitivity/{cfg.target}",
              summary="Which layers a llama.cpp type breaks, in llama.cpp, and the smallest mixed-precision file "
                      "predicted to pass the audit's thresholds (built and audited).")
