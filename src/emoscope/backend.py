"""What a model runtime can do, and the check every stage makes before any work.

Two runtimes compute a model here: transformers (`models.ModelView`, PyTorch modules) and llama.cpp
(`llamacpp.LlamaCppModel`, the GGUF file in llama.cpp's own graph). Each declares the operations it supports in
`supports`; a stage names the operations it needs and `require` refuses, in one line naming the operation and the
backend, a model that lacks one, through the Python API as through the CLI (before this, phases, trace and steer
on a llama.cpp model failed deep inside the hooks).
"""

from __future__ import annotations

from .errors import EmoscopeError

OPERATIONS = {
    "score": "score label continuations after prompts (score_ids)",
    "read_answer": "read the residual stream at the answer position (resid_post, every layer)",
    "edit_answer": "edit the residual stream at the answer position (SAE-feature ablation)",
    "check_tokens": "check its tokenizer against the reference's on given prompts",
    "hooks": "read and edit any TransformerLens hook point at every position, with gradients (PyTorch modules)",
}
"""Every operation a backend may support, and what it means."""

NEEDS = {
    "evaluate": ("score",),
    "saes": ("hooks",),
    "phases": ("hooks",),
    "trace": ("hooks",),
    "steer": ("hooks",),
    "audit": ("hooks",),  # the reference; its candidates may run on any backend with score, read_ and edit_answer
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
