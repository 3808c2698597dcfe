"""Stage `evaluate`: how well does the model recognise emotions? Raw and calibrated, side by side.

`evaluate(task)` scores every label of the task's examples, calibrates, and returns an `EvalResult`:
metrics with intervals, prior, counts (`result.json`) and per-example predictions
(`predictions.parquet`: gold, predictions, correct flags, label log-probs).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..backends.base import require
from ..artifacts import config_hash
from ..data import Example
from ..errors import EmoscopeError
from ..models import ModelConfig
from ..task import Task, TaskConfig, calibrate
from ..task.metrics import answer_shares, classification_metrics
from .base import Estimate, Stage, StageResult


class EvalResult(StageResult):
    """Task accuracy: `accuracy` / `macro_f1` (calibrated), `metrics()` per class, `predictions`."""

    stage = "evaluate"
    table_names = ("predictions",)

    @property
    def labels(self) -> list[str]:
        return self.data["labels"]

    @property
    def n(self) -> int:
        return self.data["n"]

    @property
    def accuracy(self) -> Estimate:
        return Estimate.of(self.data["calibrated"]["accuracy"])

    @property
    def macro_f1(self) -> Estimate:
        return Estimate.of(self.data["calibrated"]["macro_f1"])

    @property
    def predictions(self) -> pd.DataFrame:
        return self.tables["predictions"]

    def answers(self, scores: str = "raw") -> dict:
        """How the `raw` or `calibrated` answers spread over the labels: shares, the largest label and its share,
        and whether the predictor is degenerate (one label above half the answers); for results written before
        this was stored, recomputed from the predictions."""
        if "answers" in self.data:
            return self.data["answers"][scores]
        pred = self.predictions["pred_raw" if scores == "raw" else "pred_cal"]
        return answer_shares([self.labels.index(p) for p in pred], self.labels)

    @property
    def degenerate(self) -> bool:
        """Whether the model's own (raw) answers are one label's more than half the time."""
        return self.answers("raw")["degenerate"]

    def to_frame(self) -> pd.DataFrame:
        """Per example: id, text, gold, raw and calibrated predictions, label log-probs."""
        return self.predictions

    def metrics(self, scores: str = "calibrated") -> pd.DataFrame:
        """Per class: precision, recall, F1 with their intervals, and support (`raw` or `calibrated`)."""
        rows = []
        for lab, m in self.data[scores]["per_class"].items():
            row = {"label": lab, "support": m["support"]}
            for k in ("precision", "recall", "f1"):
                row.update({k: m[k]["value"], f"{k}_lo": m[k]["lo"], f"{k}_hi": m[k]["hi"]})
            rows.append(row)
        return pd.DataFrame(rows)

    def examples(self) -> list[Example]:
        """The evaluated examples, in order."""
        return [Example(r.id, r.text, (r.gold,)) for r in self.predictions.itertuples()]


def evaluate(task: Task, examples: list[Example] | None = None, progress=None) -> EvalResult:
    """Score the task's examples (default: its configured split and sample) raw and calibrated."""
    require(task.model, "evaluate")
    report = None
    if examples is None:
        examples, report = task.load_examples()
    if not examples:
        d = task.config.data
        raise EmoscopeError(f"no examples of {task.classes} in {d.dataset}/{d.split}")
    t0 = time.time()
    logp = task.score([e.text for e in examples], progress)
    log_prior = task.log_prior()
    t_score = time.time() - t0
    cfg, view = task.config, task.model
    raw, cal = calibrate.normalize(logp), calibrate.apply_prior(logp, log_prior)
    gold = np.array([task.classes.index(e.label) for e in examples])
    pred_raw, pred_cal = raw.argmax(1), cal.argmax(1)
    config = {"model": (view.settings or ModelConfig(name=view.name)).model_dump(mode="json"),
              **cfg.model_dump(mode="json")}
    data = {
        "stage": "evaluate", "config_hash": config_hash(config), "config": config,
        "model": {"name": view.name, "n_layers": view.n_layers, "d_model": view.d_model, "chat": task.builder.chat,
                  "backend": view.backend, "weights": view.weights, **view.describe()},
        "labels": task.classes, "n": len(examples), "seed": cfg.seed,
        "demonstrations": [{"id": x.id, "label": x.label} for x in task.demos],
        "data": {"source": report.source if report else "given examples",
                 "skipped_empty": report.skipped_empty if report else 0, "dropped": report.dropped if report else {},
                 "truncated": task.builder.n_truncated},
        "log_prior": dict(zip(task.classes, log_prior.round(6).tolist())),
        "raw": classification_metrics(gold, pred_raw, task.classes, cfg.n_boot, cfg.seed),
        "calibrated": classification_metrics(gold, pred_cal, task.classes, cfg.n_boot, cfg.seed),
        "correct_ids": [e.id for e, p in zip(examples, pred_cal) if task.classes[p] == e.label],
        "answers": {"raw": answer_shares(pred_raw, task.classes), "calibrated": answer_shares(pred_cal, task.classes)},
    }
    timing = {"score": round(t_score, 2), "per_example": round(t_score / len(examples), 4),
              "device": str(getattr(view, "device", "server")),  # an endpoint's device is the server's
              "dtype": str(getattr(view, "dtype", "server")).replace("torch.", "")}
    return EvalResult(data, {"predictions": _predictions(examples, task.classes, logp, pred_raw, pred_cal)}, timing)


def _predictions(examples, classes, logp, pred_raw, pred_cal) -> pd.DataFrame:
    df = pd.DataFrame({
        "id": [e.id for e in examples], "text": [e.text for e in examples], "gold": [e.label for e in examples],
        "pred_raw": [classes[i] for i in pred_raw], "pred_cal": [classes[i] for i in pred_cal],
    })
    df["correct_raw"], df["correct_cal"] = df.gold == df.pred_raw, df.gold == df.pred_cal
    for j, c in enumerate(classes):
        df[f"logp_{c}"] = logp[:, j]
    return df


def _run(ctx, cfg, progress, workdir) -> EvalResult:
    res = evaluate(ctx.task, progress=progress)
    res.timing = {"load": round(ctx.load_seconds, 2), **res.timing}
    return res


STAGE = Stage("evaluate", TaskConfig, EvalResult, upstream=(), needs=(), run=_run, printer="print_eval",
              summary="Score the task's examples raw and calibrated: accuracy and macro-F1 with intervals.")
