"""`Task`: one model asked to recognise one label set, with one prompt template and demonstrations.

Everything a later stage needs to talk to the model about emotions goes through it: the prompt of a
text (`prompt`, `encode`), the label continuations (`label_ids`, `label_tokens`), label scores
(`score`), the calibration prior (`log_prior`) and calibrated predictions (`predict`), and the
task's own examples (`examples`), which never include a demonstration.
"""

from __future__ import annotations


from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..data import (DataConfig, Example, LoadReport, check_classes, demonstrations, label_set, label_source,
                    load_split, select)
from ..errors import EmoscopeError, validated
from . import calibrate
from .prompts import PromptBuilder, Template
from ..constraints import Seed
from ..backends.base import Backend



class TaskConfig(BaseModel):
    """The task's settings: data, prompt, demonstrations, calibration (the run config's `evaluate:`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    data: DataConfig = DataConfig()
    template: Template = Template()
    shots: int = Field(0, ge=0)
    """Few-shot demonstrations, drawn from the train split."""
    calibration: Literal["contextual", "train"] = "contextual"
    """Prior to subtract: content-free inputs, or train texts."""
    train_prior_n: int = Field(60, ge=1)
    """Train texts used to estimate the prior when calibration = train."""
    seed: Seed = 0
    """Seed for sampling, demonstrations and the bootstrap."""
    batch_size: int = Field(8, ge=1)
    """Prompts per forward pass."""
    n_boot: int = Field(1000, ge=100)
    """Bootstrap replicates for intervals."""

    @classmethod
    def build(cls, config: "TaskConfig | dict | None" = None, **settings) -> "TaskConfig":
        """A config from a base (config object or dict) and flat overrides: data keys (dataset, labels,
        split, per_class, ...) go under `data`, the others to the top."""
        base = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
        data = dict(base.get("data") or {})
        for key, value in settings.items():
            if key in DataConfig.model_fields:
                data[key] = value
            elif key in cls.model_fields and key != "data":
                base[key] = value
            else:
                keys = sorted(set(DataConfig.model_fields) | set(cls.model_fields) - {"data"})
                raise EmoscopeError(f"unknown task setting '{key}': choose from {', '.join(keys)}")
        return validated(cls, {**base, "data": data})


class Task:
    """An emotion-recognition task on one model.

    >>> task = Task(model, dataset="goemotions_ekman", shots=2)
    >>> task.predict(["I can't believe you did that!"])   # DataFrame: probabilities, prediction
    """

    def __init__(self, model: Backend, config: TaskConfig | dict | None = None, **settings):
        self.config = cfg = TaskConfig.build(config, **settings)
        self.model = model
        d = cfg.data
        train, train_report = load_split(d.dataset, "train", d.data_dir, d.text_column, d.label_column)
        self.classes = label_set(label_source(d, train), d.labels, d.extra)
        self.train_pool = select(train, self.classes, train_report, d.multi_label)
        self._build(demonstrations(self.train_pool, self.classes, cfg.shots, cfg.seed))

    @classmethod
    def from_parts(cls, model: Backend, config: TaskConfig, classes: list[str], demos: list[Example],
                   prior_texts: list[str] | None = None) -> "Task":
        """The task without its data: given labels, demonstrations and (with calibration = train) the prior's texts,
        as a canary check in a serving process needs, which has no dataset."""
        self = cls.__new__(cls)
        self.config, self.model, self.classes, self.train_pool = config, model, list(classes), []
        self._build(list(demos))
        self._prior_texts = list(prior_texts) if prior_texts is not None else None
        if config.calibration == "train" and prior_texts is None:
            raise EmoscopeError("a task without its data and with calibration = train needs the prior's texts")
        return self

    def _build(self, demos: list[Example]) -> None:
        self.demos = demos
        self.builder = PromptBuilder(self.model.tokenizer, self.config.template, self.classes, demos, self.model.chat,
                                     self.model.max_context)
        self._label_ids: list[list[int]] | None = None
        self._prior: np.ndarray | None = None
        self._prior_texts: list[str] | None = None

    @property
    def labels(self) -> list[str]:
        return self.classes

    def variant(self, model: Backend | None = None, **settings) -> "Task":
        """The same task with some settings changed (another template, shots, seed) or on another model."""
        return Task(model or self.model, self.config, **settings)

    # ------------------------------------------------------------------ prompts and labels
    def prompt(self, text: str) -> str:
        return self.builder.prompt(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of the prompt for one text; the answer follows its last token."""
        return self.builder.encode(self.builder.prompt(text))

    def encode_all(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def positions(self, text: str, mode: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt for `text` and the positions to keep: the final prompt token (`last`,
        the one that predicts the label), every token overlapping the text (`text`), or all but the first."""
        if mode not in ("last", "text", "all"):
            raise EmoscopeError(f"unknown positions '{mode}': choose last, text, all")
        prompt, (a, b) = self.builder.prompt_with_span(text)
        tok = self.builder.tok
        enc = tok(prompt, add_special_tokens=not (tok.bos_token and prompt.startswith(tok.bos_token)),
                  return_offsets_mapping=True)
        ids = enc.input_ids
        if mode == "last":
            return ids, [len(ids) - 1]
        if mode == "all":
            return ids, list(range(1, len(ids)))
        return ids, [i for i, (s, e) in enumerate(enc.offset_mapping) if e > a and s < b and e > s]

    @property
    def label_ids(self) -> list[list[int]]:
        """Token ids of each label's continuation."""
        if self._label_ids is None:
            self._label_ids = self.builder.label_ids()
        return self._label_ids

    @property
    def label_tokens(self) -> list[int]:
        """Each label's first token: what the causal stages read at the answer position."""
        return [ids[0] for ids in self.label_ids]

    # ------------------------------------------------------------------ scoring
    def score(self, texts, progress=None) -> np.ndarray:
        """Summed log-probabilities of every label's tokens after each text's prompt [n, K] (raw)."""
        return self.model.score_ids(self.encode_all(texts), self.label_ids, self.config.batch_size, progress)

    def prior_texts(self) -> list[str]:
        """The texts the calibration prior is read from: content-free inputs, or a seeded sample of train texts."""
        cfg = self.config
        if cfg.calibration == "contextual":
            return list(calibrate.CONTENT_FREE)
        if self._prior_texts is None:
            rng = np.random.default_rng(cfg.seed + 1)
            n = min(cfg.train_prior_n, len(self.train_pool))
            self._prior_texts = [self.train_pool[i].text
                                 for i in sorted(rng.choice(len(self.train_pool), size=n, replace=False))]
        return self._prior_texts

    def log_prior(self) -> np.ndarray:
        """The calibration prior over labels, in log space [K]: content-free inputs or train texts."""
        if self._prior is None:
            self._prior = calibrate.prior_from_scores(self.score(self.prior_texts()))
        return self._prior

    def predict(self, texts) -> pd.DataFrame:
        """Per text: raw and calibrated label probabilities and both predictions."""
        texts = list(texts)
        logp = self.score(texts)
        raw, cal = np.exp(calibrate.normalize(logp)), np.exp(calibrate.apply_prior(logp, self.log_prior()))
        df = pd.DataFrame({"text": texts})
        for j, c in enumerate(self.classes):
            df[f"raw_{c}"], df[f"p_{c}"] = raw[:, j], cal[:, j]
        df["pred_raw"] = [self.classes[i] for i in raw.argmax(1)]
        df["pred"] = [self.classes[i] for i in cal.argmax(1)]
        return df

    # ------------------------------------------------------------------ data
    def examples(self, split: str | None = None, per_class: int | None | Literal["config"] = "config") -> list[Example]:
        """The task's examples of a split (default: the config's), balanced per class as configured;
        rows used as demonstrations are never among them."""
        return self.load_examples(split, per_class)[0]

    def load_examples(self, split: str | None = None, per_class: int | None | Literal["config"] = "config"
                      ) -> tuple[list[Example], LoadReport]:
        """`examples`, and the report of what was skipped or dropped on the way."""
        d = self.config.data
        split = split or d.split
        per_class = d.per_class if per_class == "config" else per_class
        rows, report = load_split(d.dataset, split, d.data_dir, d.text_column, d.label_column)
        check_classes(rows, self.classes, d, split)
        demo_ids = {e.id for e in self.demos}
        kept = [e for e in rows if e.id not in demo_ids]
        if len(kept) < len(rows):
            report.drop("used as a demonstration", len(rows) - len(kept))
        return select(kept, self.classes, report, d.multi_label, per_class, self.config.seed, split), report
