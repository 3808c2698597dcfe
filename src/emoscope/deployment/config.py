"""The audit's settings: its candidates, the thresholds of its verdict and the rest (`AuditConfig`), owned here so
that the reference, the candidates and the audit stage read one definition without importing each other."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..constraints import NonNegative, Seed, Share, unique_names
from .candidates import Candidate
from .kld import KLDConfig


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    max_accuracy_drop: Share = 0.05
    """Largest tolerated drop in calibrated accuracy."""
    max_flip_rate: Share = 0.2
    """Largest tolerated share of changed predictions."""
    min_causal_survival: Share = 0.5
    """Smallest tolerated share of causal features still active."""
    min_effect_retained: NonNegative | None = None
    """Smallest tolerated share of the causal sets' ablation effect still there (None: not gated)."""

    def verdict(self, accuracy_change: float, flip_rate: float, survival: float | None = None,
                effect: float | None = None, non_finite: bool = False) -> list[str]:
        """What a build breaks: 'labels' (a non-finite answer, accuracy drop or flips over the thresholds) and
        'features' (causal survival or, where gated and measured, effect retained under them); empty: it passes. A
        measure given as None (not measured) gates nothing."""
        out, eps = [], 1e-9  # a rate at its threshold passes: 5 flips of 100 are 0.05 up to float round-off
        if non_finite or -accuracy_change > self.max_accuracy_drop + eps or flip_rate > self.max_flip_rate + eps:
            out.append("labels")
        weak = self.min_effect_retained is not None and effect is not None and effect < self.min_effect_retained - eps
        if (survival is not None and survival < self.min_causal_survival - eps) or weak:
            out.append("features")
        return out


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    candidates: Annotated[list[Candidate], Field(min_length=1),
                          AfterValidator(lambda v: unique_names(v, "candidates"))] | Literal["default"] = "default"
    """Candidates, or 'default': paraphrases, label order, system prompt, demonstrations, text noise,
    bf16/fp16/int8/int4/int3."""
    thresholds: Thresholds = Thresholds()
    kld: KLDConfig | None = None
    """WikiText-2 windows on which every candidate that changes the model gets llama-perplexity's KL-divergence
    statistics against the reference in its own runtime (None: not measured)."""
    causal_features: dict[str, list[tuple[int, int]]] | None = None
    """Causal features per emotion as [layer, feature] pairs; default: tracing's sets, else the phases stage's top
    features."""
    ablation_per_emotion: int = Field(20, ge=0)
    """Examples per emotion on which each candidate's causal sets are ablated, to see whether they still matter (0:
    skip)."""
    top_k: int = Field(32, ge=1)
    """Active features compared by Jaccard per layer."""
    group_size: int = Field(128, ge=8)
    """Group size of the RTN weight quantization."""
    n_boot: int = Field(1000, ge=100)
    """Paired bootstrap resamples."""
    seed: Seed = 0
    """Seed for text noise, demonstrations and the bootstrap."""
