"""Candidate changes for the brittleness audit: prompt perturbations and weight precisions.

Weight precision: bfloat16 / float16 casts, and weight-only group-wise round-to-nearest (RTN)
fake quantization at 8, 4 or 3 bits: each row of every linear weight in the transformer blocks is
cut into groups of `group_size` values, each group is scaled symmetrically to the integer grid
[-(2^(b-1)-1), 2^(b-1)-1], rounded, and scaled back. Embeddings, norms and the unembedding stay in
float, as in common weight-only schemes. The error of every weight is at most half its group's
step (scale / 2), which a test checks. This is a faithful simulation of the arithmetic of
weight-only RTN kernels, not a speed-up.

llama.cpp formats (`gguf:Q8_0`, `gguf:Q5_1`, `gguf:Q5_0`, `gguf:Q4_1`, `gguf:Q4_0`, and any other type the
installed `gguf` package can quantize): each weight is quantized and dequantized by the `gguf` package
itself (`gguf.quants.quantize` / `dequantize`), so the model holds exactly the values llama.cpp would
compute with. They apply to the tensors llama.cpp stores in that type: every 2-D weight of the
transformer blocks and an untied token embedding. The output projection (or a tied embedding, which
serves as it) stays in float: llama.cpp stores it as Q6_K, which the `gguf` package cannot produce. A
tensor whose rows are not a multiple of the type's block size stays in float (llama.cpp falls back to
another type there); both are counted in what the change reports.
"""

from __future__ import annotations

import functools
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EmoscopeError
from ..quantization import SCHEMES as LIBRARY
from ..task.prompts import Template

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4", "int3")

PARAPHRASES = [
    "Which emotion does this text express? Choose one of: {options}.",
    "Read the text and name its emotion ({options}).",
    "Label the feeling in the following message. Possible labels: {options}.",
    "What is the author feeling? Answer with a single word among {options}.",
    "Emotion classification. Options: {options}. Give the best label for the text.",
    "Identify the dominant emotion of the writer, one of {options}.",
]


@torch.no_grad()
def rtn_quantize_(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize a 2-D weight in place, group-wise along the input dimension; returns the
    per-group step sizes [rows, groups] (the error bound is step / 2)."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise EmoscopeError(f"unsupported bit width {bits}: choose 3, 4 or 8 (2-8 allowed)")
    rows, cols = weight.shape
    pad = (-cols) % group_size
    w = torch.nn.functional.pad(weight.float(), (0, pad)).view(rows, -1, group_size)
    qmax = 2 ** (bits - 1) - 1
    step = (w.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    q = (w / step).round().clamp(-qmax, qmax) * step
    weight.copy_(q.view(rows, -1)[:, :cols].to(weight.dtype))
    return step[..., 0]


@functools.cache
def gguf_types() -> tuple[str, ...]:
    """The llama.cpp quantization types the installed `gguf` package can produce (quantize and dequantize)."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize, quantize
    except ImportError:
        return ()
    out = []
    for t in GGMLQuantizationType:
        if t.name in ("F32", "F16", "BF16", "F64") or t not in GGML_QUANT_SIZES:
            continue
        try:
            dequantize(quantize(np.zeros((1, 256), np.float32), t), t)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            continue
        out.append(t.name)
    return tuple(out)


def check_precision(precision: str) -> str:
    """The precision itself, or one line naming the choices."""
    if precision in PRECISIONS or (precision.startswith("gguf:") and precision[5:] in gguf_types()) or \
            precision in LIBRARY:
        return precision
    kinds = ", ".join([*PRECISIONS, *(f"gguf:{t}" for t in gguf_types()), *LIBRARY])
    raise EmoscopeError(f"unknown precision '{precision}': choose {kinds}")


def gguf_quantize_(weight: torch.Tensor, type_name: str) -> bool:
    """Replace a 2-D weight in place by its llama.cpp quantize-dequantize round trip (through the gguf
    package); False, unchanged, when its rows are not a multiple of the type's block size."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[type_name]
    if weight.shape[-1] % GGML_QUANT_SIZES[t][0]:
        return False
    w = weight.detach().float().cpu().numpy()
    with torch.no_grad():
        weight.copy_(torch.from_numpy(dequantize(quantize(w, t), t).reshape(w.shape)).to(weight.dtype))
    return True


def _apply_gguf(view, type_name: str) -> dict:
    done = skipped = 0
    for w in _gguf_targets(view):
        if gguf_quantize_(w, type_name):
            done += 1
        else:
            skipped += 1
    return {"precision": f"gguf:{type_name}", "method": f"llama.cpp {type_name} round trip through gguf "
            f"{_version('gguf')}", "tensors": done,
            "kept_float": {"output projection / tied embedding (llama.cpp: Q6_K)": 1, "rows not a multiple of the "
                           "block size": skipped}}


def _gguf_targets(view) -> list[torch.Tensor]:
    """The tensors llama.cpp stores in the file's type: the blocks' 2-D weights and an untied token embedding."""
    emb, out = view.model.get_input_embeddings().weight, view.model.get_output_embeddings().weight
    blocks = [p for p in view.blocks.parameters() if p.dim() == 2]
    return blocks + ([emb] if emb.data_ptr() != out.data_ptr() else [])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def apply_precision(view, precision: str, group_size: int = 128) -> dict:
    """Change the loaded model in place to the given precision; returns what was done. (Library kernels,
    `torchao:int8` and the like, are loaded as a model of their own: `quantization.py`.)"""
    if check_precision(precision) in LIBRARY:
        raise EmoscopeError(f"precision {precision} is a library's kernels: load the model with quantization=...")
    if check_precision(precision).startswith("gguf:"):
        return _apply_gguf(view, precision[5:])
    if precision in ("float32", "bfloat16", "float16"):
        view.model.to(getattr(torch, precision))
        return {"precision": precision, "method": "cast"}
    bits = int(precision[3:])
    weights = _changed_tensors(view, precision)  # the same tensors precision_applied parks and restores
    for w in weights.values():
        rtn_quantize_(w, bits, group_size)
    n = len(weights)
    return {"precision": precision,
            "method": f"weight-only group-wise RTN fake quantization, {bits} bits, group {group_size}",
            "linear_layers": n}


def _changed_tensors(view, precision: str) -> dict[str, torch.Tensor]:
    """The tensors a precision change rewrites: every floating parameter and buffer for a cast, the
    linear weights of the blocks for RTN (tied parameters once)."""
    if precision in ("float32", "bfloat16", "float16"):
        named = [*view.model.named_parameters(), *view.model.named_buffers()]
        return {n: t for n, t in named if t.is_floating_point()}
    if precision.startswith("gguf:"):
        targets = {id(t) for t in _gguf_targets(view)}
        return {n: p for n, p in view.model.named_parameters() if id(p) in targets}
    prefix = view.blocks_path + "."
    return {f"{prefix}{i}.{n}.weight": m.weight for i, block in enumerate(view.blocks)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _by_name(model: nn.Module, names) -> dict[str, torch.Tensor]:
    every = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: every[n] for n in names}


@contextmanager
def precision_applied(view, precision: str, group_size: int = 128):
    """Within the block the loaded model runs at `precision` (yields what was done); afterwards its weights
    are restored bit for bit. The originals wait in raw files in a temporary folder (written and read back
    one tensor at a time, memory-mapped), so a second copy of the model is never held in memory."""
    if view.offloaded:
        raise EmoscopeError(f"precision {precision}: the model is partly offloaded (model.device_map), so its weights "
                            "cannot be changed in place; audit precisions with the model in memory")
    changed = _changed_tensors(view, check_precision(precision))
    dtypes = {n: t.dtype for n, t in changed.items()}
    with tempfile.TemporaryDirectory(prefix="emoscope-weights-") as tmp:
        for i, t in enumerate(changed.values()):
            _raw(t).numpy().tofile(Path(tmp) / str(i))  # a contiguous CPU tensor is written without a copy
        try:
            yield apply_precision(view, precision, group_size)
        finally:
            with torch.no_grad():
                for i, (n, t) in enumerate(_by_name(view.model, changed).items()):
                    if t.dtype != dtypes[n]:  # a cast replaced it: back to the loaded dtype, then the loaded bytes
                        t.data = t.data.to(dtypes[n])
                    if t.numel():
                        kept = np.memmap(Path(tmp) / str(i), dtype=_INT[t.element_size()], mode="c", shape=t.numel())
                        t.copy_(torch.from_numpy(kept).view(t.dtype).view(t.shape))


_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A CPU view of a tensor's bytes as an integer type NumPy can write (bfloat16 has no NumPy dtype)."""
    cpu = t.detach().cpu().contiguous()
    return cpu.view(getattr(torch, np.dtype(_INT[cpu.element_size()]).name))


def perturb_text(text: str, kind: str, rng: random.Random, rate: float = 0.05) -> str:
    """Surface noise on the input text: 'lower', 'upper', 'whitespace' or 'typos' (adjacent swaps)."""
    if kind == "lower":
        return text.lower()
    if kind == "upper":
        return text.upper()
    if kind == "whitespace":
        return "  ".join(text.split()) + " "
    if kind == "typos":
        chars = list(text)
        for i in range(len(chars) - 1):
            if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < rate:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    raise EmoscopeError(f"unknown text perturbation '{kind}': choose lower, upper, whitespace, typos")


def template_variants(base: Template, labels: list[str], seed: int = 0) -> dict[str, Template]:
    """Named prompt-template candidates: paraphrased instructions, permuted label order, a system
    prompt added (or removed when the base has one)."""
    out = {f"paraphrase_{i + 1}": base.model_copy(update={"instruction": p}) for i, p in enumerate(PARAPHRASES)}
    order = labels[:]
    random.Random(seed).shuffle(order)
    if order == labels:
        order = labels[::-1]
    out["label_order_permuted"] = base.model_copy(update={"label_order": order})
    out["system_prompt"] = base.model_copy(update={"system": None if base.system else "You are a careful annotator of "
                                                                                      "emotions in text."})
    return out
