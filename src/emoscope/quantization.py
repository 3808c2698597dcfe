"""Weights quantized on load by the libraries deployments use: torchao, optimum-quanto, bitsandbytes.

`model.quantization` (and an audit candidate's `precision`) names a library and a scheme; the model is
loaded through `transformers`' quantization config for that library, so its own kernels run (where
the library has them for the device) — not a simulation. `describe` names the library, its version and
the tensor type the weights became, so a result says exactly what ran.

CPU notes (torchao 0.18, optimum-quanto 0.2.7): torchao int8 stores `Int8Tensor` weights; torchao's
`Int4WeightOnlyConfig` needs CUDA (or the mslk kernels), so on the CPU `torchao:int4` is its
`IntxWeightOnlyConfig` (int4 values, per-group scales, unpacked into int8 storage); quanto int8/int4
run on the CPU; bitsandbytes needs CUDA.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import EmoscopeError

SCHEMES = {"torchao:int8": "int8 weight-only", "torchao:int4": "int4 weight-only, per-group scales",
           "quanto:int8": "int8 weights", "quanto:int4": "int4 weights", "quanto:float8": "float8 weights",
           "bnb:int8": "LLM.int8()", "bnb:nf4": "NF4, 4-bit"}
PACKAGES = {"torchao": "torchao", "quanto": "optimum-quanto", "bnb": "bitsandbytes"}


def check(spec: str) -> str:
    if spec not in SCHEMES:
        raise EmoscopeError(f"unknown quantization '{spec}': choose {', '.join(SCHEMES)}")
    return spec


def version(spec: str) -> str:
    """'torchao 0.18.0', or one line saying what to install."""
    pkg = PACKAGES[check(spec).split(":")[0]]
    try:
        return f"{pkg} {importlib.metadata.version(pkg)}"
    except importlib.metadata.PackageNotFoundError:
        raise EmoscopeError(f"quantization {spec} needs `pip install {pkg}`") from None


def group_size(path: str | Path, wanted: int) -> int:
    """The largest power-of-two group <= `wanted` that divides the model's hidden and MLP widths (every
    linear layer's input), read from its config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path).get_text_config()
    widths = [getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size")]
    g = wanted
    while g > 1 and any(w and w % g for w in widths):
        g //= 2
    return g


def config(spec: str, device: str, path: str | Path, group: int = 128):
    """The `transformers` quantization config for `spec` on `device`."""
    version(spec)
    lib, scheme = spec.split(":")
    if lib == "bnb":
        if not device.startswith("cuda"):
            raise EmoscopeError(f"quantization {spec}: bitsandbytes runs on CUDA here, and the model is on {device}")
        from transformers import BitsAndBytesConfig
        return (BitsAndBytesConfig(load_in_8bit=True) if scheme == "int8" else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    if lib == "quanto":
        from transformers import QuantoConfig
        return QuantoConfig(weights=scheme)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig
    import torch

    if scheme == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    g = group_size(path, group)
    if device.startswith("cuda"):
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=g))
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g)))


def describe(model, spec: str) -> dict:
    """What ran: library and version, the scheme, and the tensor or module types the weights became."""
    kinds = sorted({type(getattr(m, "weight", None)).__name__ for m in model.modules()
                    if type(m).__name__ != "Embedding" and hasattr(m, "weight") and
                    type(getattr(m, "weight", None)).__name__ not in ("Parameter", "Tensor", "NoneType")})
    modules = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("QLinear", "Linear8bitLt",
                                                                                         "Linear4bit")})
    return {"library": version(spec), "scheme": SCHEMES[spec], "kernels": kinds + modules}
