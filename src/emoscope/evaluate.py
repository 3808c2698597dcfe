"""Stage `evaluate`: how well does the model recognise emotions? Raw and calibrated, side by side.

`evaluate(config, run_dir)` loads the data, builds prompts, scores every label, calibrates, and
writes `run_dir/evaluate/`: `result.json` (metrics with intervals, prior, counts, timing) and
`predictions.parquet` (per example: gold, predictions, correct flags, label log-probs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from . import calibrate
from .artifacts import config_hash, read_json, stage_dir, write_json
from .data import demonstrations, label_set, load_split, select
from .metrics import classification_metrics
from .models import DEFAULT_MODEL, ModelView, load_model
from .prompts import PromptBuilder, Template
from .score import score_ids


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(DEFAULT_MODEL, description="Registry name (smollm2-135m-instruct, gemma3-270m), .gguf file, local dir or HF id.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="float32 (exact, default), bfloat16, float16, or auto = bfloat16 on CUDA or a CPU with native bf16.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub (off unless you ask).")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field("goemotions_ekman", description="goemotions_ekman, isear, dair_emotion, or a CSV/TSV/JSONL path.")
    split: str = Field("test", description="Split to evaluate: train, dev or test.")
    data_dir: str | None = Field(None, description="Folder holding the dataset folders (else $EMOSCOPE_DATA, ../shared/data).")
    labels: list[str] | None = Field(None, description="Task labels; None = the Ekman six that the data has.")
    extra: Literal["drop", "keep"] = Field("drop", description="Other labels of the data (neutral, love, ...): drop the rows or keep as classes.")
    multi_label: Literal["drop", "first"] = Field("drop", description="Rows with several labels: drop them, or keep their first label.")
    per_class: int | None = Field(50, ge=1, description="Balanced sample size per class; None = every row.")
    text_column: str = Field("text", description="Text column of a CSV/TSV/JSONL file (MELD: Utterance).")
    label_column: str = Field("label", description="Label column of a CSV/TSV/JSONL file (MELD: Emotion).")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    template: Template = Template()
    shots: int = Field(0, ge=0, description="Few-shot demonstrations, drawn from the train split.")
    calibration: Literal["contextual", "train"] = Field("contextual", description="Prior to subtract: content-free inputs, or train texts.")
    train_prior_n: int = Field(60, ge=1, description="Train texts used to estimate the prior when calibration = train.")
    seed: int = Field(0, description="Seed for sampling, demonstrations and the bootstrap.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    n_boot: int = Field(1000, ge=100, description="Bootstrap replicates for intervals.")


class Task:
    """Everything needed to score texts for one config: classes, demonstrations, prompt builder."""

    def __init__(self, cfg: EvalConfig, view: ModelView):
        d = cfg.data
        train, train_report = load_split(d.dataset, "train", d.data_dir, d.text_column, d.label_column)
        self.classes = label_set(train, d.labels, d.extra)
        self.train_pool = select(train, self.classes, train_report, d.multi_label)
        demos = demonstrations(self.train_pool, self.classes, cfg.shots, cfg.seed)
        self.builder = PromptBuilder(view.tokenizer, cfg.template, self.classes, demos, view.chat, view.max_context)
        self.view, self.cfg = view, cfg

    def score(self, texts: list[str], progress=None) -> np.ndarray:
        prompts = [self.builder.encode(self.builder.prompt(t)) for t in texts]
        return score_ids(self.view, prompts, self.builder.label_ids(), self.cfg.batch_size, progress)

    def log_prior(self) -> np.ndarray:
        if self.cfg.calibration == "contextual":
            texts = calibrate.CONTENT_FREE
        else:
            rng = np.random.default_rng(self.cfg.seed + 1)
            pick = rng.choice(len(self.train_pool), size=min(self.cfg.train_prior_n, len(self.train_pool)), replace=False)
            texts = [self.train_pool[i].text for i in sorted(pick)]
        return calibrate.prior_from_scores(self.score(texts))


def evaluate(cfg: EvalConfig, run_dir: str | Path, view: ModelView | None = None, progress=None) -> dict:
    """Run the stage and return its result.json content."""
    t0 = time.time()
    view = view or load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
    t_load = time.time() - t0
    task = Task(cfg, view)
    d = cfg.data
    rows, report = load_split(d.dataset, d.split, d.data_dir, d.text_column, d.label_column)
    examples = select(rows, task.classes, report, d.multi_label, d.per_class, cfg.seed, d.split)
    if not examples:
        from .errors import EmoscopeError
        raise EmoscopeError(f"no examples of {task.classes} in {d.dataset}/{d.split}")
    t1 = time.time()
    logp = task.score([e.text for e in examples], progress)
    log_prior = task.log_prior()
    t_score = time.time() - t1
    raw = calibrate.normalize(logp)
    cal = calibrate.apply_prior(logp, log_prior)
    gold = np.array([task.classes.index(e.label) for e in examples])
    pred_raw, pred_cal = raw.argmax(1), cal.argmax(1)
    m_raw = classification_metrics(gold, pred_raw, task.classes, cfg.n_boot, cfg.seed)
    m_cal = classification_metrics(gold, pred_cal, task.classes, cfg.n_boot, cfg.seed)
    result = {
        "stage": "evaluate",
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "model": {"name": view.name, "n_layers": view.n_layers, "d_model": view.d_model, "chat": task.builder.chat},
        "labels": task.classes,
        "n": len(examples),
        "seed": cfg.seed,
        "demonstrations": [{"id": x.id, "label": x.label} for x in task.builder.demos],
        "data": {"source": report.source, "skipped_empty": report.skipped_empty, "dropped": report.dropped,
                 "truncated": task.builder.n_truncated},
        "log_prior": dict(zip(task.classes, log_prior.round(6).tolist())),
        "raw": m_raw,
        "calibrated": m_cal,
        "correct_ids": [e.id for e, p in zip(examples, pred_cal) if task.classes[p] == e.label],
    }
    # timings live apart from results, so that reruns give byte-identical result files
    timing = {"load": round(t_load, 2), "score": round(t_score, 2), "per_example": round(t_score / len(examples), 4),
              "device": str(view.device), "dtype": str(view.dtype).replace("torch.", "")}
    df = pd.DataFrame({
        "id": [e.id for e in examples], "text": [e.text for e in examples], "gold": [e.label for e in examples],
        "pred_raw": [task.classes[i] for i in pred_raw], "pred_cal": [task.classes[i] for i in pred_cal],
    })
    df["correct_raw"], df["correct_cal"] = df.gold == df.pred_raw, df.gold == df.pred_cal
    for j, c in enumerate(task.classes):
        df[f"logp_{c}"] = logp[:, j]
    with stage_dir(run_dir, "evaluate") as out:
        write_json(out / "result.json", result)
        write_json(out / "timing.json", timing)
        df.to_parquet(out / "predictions.parquet", index=False)
    return result


def load_result(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "evaluate" / "result.json")
