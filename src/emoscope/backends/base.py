"""The one model interface: what a runtime that computes a model offers the stages, and the check every stage makes.

Two runtimes implement it as methods: transformers (`backends.transformers.ModelView`, PyTorch modules, every
operation) and llama.cpp (`backends.llamacpp.LlamaCppModel`, the GGUF file in llama.cpp's own graph: scores, and the
residual read and edited at the answer position). The stages call these methods and nothing else, so a third runtime
(a serving endpoint that can only score) is one more class. Each declares the operations it supports in `supports`;
a stage names the operations it needs (`NEEDS`) and `require` refuses, in one line naming the operation and the
backend, a model that lacks one, before any work, through the Python API as through the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from ..errors import EmoscopeError

if TYPE_CHECKING:
    import numpy as np
    import torch

RUNTIMES = ("transformers", "llama.cpp")
"""The runtimes that compute a model: a model setting's `backend`, an audit candidate's `runtime` (one word each)."""
Runtime = Literal[RUNTIMES]
BACKENDS = (*RUNTIMES, "endpoint")
"""What a model setting's `backend` may name: a runtime, or `endpoint` (a serving URL, scored over HTTP)."""

OPERATIONS = {
    "score": "score label continuations after prompts (score_ids)",
    "read_answer": "read the residual stream at the answer position (resid_post, every layer)",
    "edit_answer": "edit the residual stream at the answer position (SAE-feature ablation)",
    "check_tokens": "check its tokenizer against the reference's on given prompts",
    "logits": "next-token logits over the vocabulary at every position of a sequence (token_logits)",
    "hooks": "read and edit any TransformerLens hook point at every position, with gradients (PyTorch modules)",
}
"""Every operation a backend may support, and what it means."""


@runtime_checkable
class Backend(Protocol):
    """A model as the stages see it, whatever computes it. Attributes: `name`, `backend` (the runtime's name),
    `tokenizer` (the reference's: every backend is fed its token ids), `chat`, `n_layers`, `d_model`, `weights`
    (what the weights are, for a report), `settings` (how it was loaded, or None), `supports` (its operations)."""

    name: str
    backend: str
    tokenizer: object
    chat: bool
    n_layers: int
    d_model: int
    weights: str | None
    supports: frozenset[str]

    def score_ids(self, prompts: list[list[int]], labels: list[list[int]], batch_size: int = 8, progress=None,
                  resid_layers: list[int] = ()):
        """score (and read_answer with `resid_layers`): [n, K] summed label log-probs after each prompt; with
        `resid_layers`, also {layer: [n, d]} float32 residuals at each prompt's answer position."""

    def label_logits(self, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:
        """score: the logits of `tokens` (the labels' first tokens) at each prompt's answer position [n, K]."""

    def ablate_each(self, saes: dict, prompts: list[list[int]], gold: np.ndarray, tokens: list[int],
                    sets: list[dict[int, list[int]]], log_prior: torch.Tensor | None = None, baseline=None,
                    kind: str = "best_other") -> np.ndarray:
        """edit_answer: the calibrated gold margin of every prompt [len(sets), n] with each set of SAE features
        (layer -> features) clamped to the baseline (zero) at the answer position, the SAE error kept."""

    def token_logits(self, ids: list[int]) -> np.ndarray:
        """logits: the next-token logits over the vocabulary at every position of one sequence [T, V], float32
        (llama-perplexity's statistics, `deployment.kld`)."""

    def check_tokens(self, prompts: list[str], ids: list[list[int]], labels: list[str],
                     label_ids: list[list[int]]) -> None:
        """check_tokens: refuse, in one line, a tokenizer that encodes these prompts or labels into other ids."""

    def describe(self) -> dict:
        """What runs, for a result row (runtime and its version, file type and bytes, threads, KV cache)."""

NEEDS = {
    "evaluate": ("score",),
    "saes": ("hooks",),
    "phases": ("hooks",),
    "trace": ("hooks",),
    "steer": ("hooks",),
    "audit": ("hooks",),  # the reference; its candidates may run on any backend with score, read_ and edit_answer
    "canary": ("hooks",),  # the audit's reference
    "sensitivity": ("hooks",),  # the audit's reference; its files run in llama.cpp
}
"""The operations each stage needs of the model it analyses."""


def supports(model) -> frozenset[str]:
    """The operations `model` declares (`supports`); a model that declares none is taken as a PyTorch one."""
    return frozenset(getattr(model, "supports", OPERATIONS))


def require(model, stage: str) -> None:
    """Refuse, before any work, a model whose backend lacks an operation `stage` needs."""
    missing = [op for op in NEEDS[stage] if op not in supports(model)]
    if missing:
        name = getattr(model, "backend", "transformers")
        raise EmoscopeError(f"stage {stage} needs '{missing[0]}' ({OPERATIONS[missing[0]]}), which backend {name} does "
                            f"not support (it supports {', '.join(sorted(supports(model)))}): run the stage with "
                            "backend transformers")


def token_mismatch(tokenize, bos: str | None, prompts: list[str], ids: list[list[int]], labels: list[str],
                   label_ids: list[list[int]]) -> str | None:
    """What a backend's own tokenizer (`tokenize(text, add_special) -> ids`) encodes differently from the reference's
    ids, as "<a prompt | the label ...> differently from the reference ...", or None when every prompt and label
    agrees (the `check_tokens` operation of every backend that does not run on the reference's tokenizer)."""
    for text, want in zip(prompts, ids):
        got = tokenize(text, not (bos and text.startswith(bos)))
        if got != list(want):
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return f"a prompt differently from the reference (first difference at token {at} of {len(want)})"
    for lab, want in zip(labels, label_ids):
        if tokenize(lab, False) != list(want):
            return f"the label {lab!r} differently from the reference"
    return None
