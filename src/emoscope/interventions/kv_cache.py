"""A quantized KV cache as an audit candidate: every attention reads keys and values that went through
the cache's quantizer, the way a deployed runtime reads them back from its cache.

`kv_cache_quantized(view, spec)` is a context manager; within it the model's attention implementation
is a registered wrapper (transformers' `AttentionInterface`) that quantizes and dequantizes the keys
and values each layer attends over, then calls the implementation the model had (sdpa, eager, ...).
Every position is affected, the prompt's own included, as in llama.cpp, which writes each token's K/V
into its quantized cache and attends over the cache (transformers' `QuantizedCache` instead keeps the
prompt's states in full precision for the prompt's own forward and quantizes what later tokens read;
for a one-token answer it would change nothing). Being applied to the attention's inputs, it works
with every prompt cache emoscope uses for shared-prefix scoring (the cache holds the unquantized
states; each read quantizes them again, deterministically).

Schemes (`spec`):
- `quanto:int4`, `quanto:int2`: the quantizer of transformers' `QuantizedCache(backend="quanto")`
  (optimum-quanto, asymmetric with zero point, groups along the head dimension: 64 values or the
  largest power of two dividing head_dim);
- `gguf:Q8_0`, `gguf:Q4_0`, `gguf:Q4_1`, `gguf:Q5_0`, `gguf:Q5_1`: llama.cpp's `--cache-type-k/-v`
  types, through the gguf package's reference quantizer, in blocks of 32 along the head dimension.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from importlib.metadata import version

import numpy as np
import torch

from ..errors import EmoscopeError

QUANTO = {"quanto:int4": 4, "quanto:int2": 2}
GGUF = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the quantized types llama.cpp's KV cache takes
KV_SCHEMES = (*QUANTO, *(f"gguf:{t}" for t in GGUF))


def check_kv_cache(spec: str) -> str:
    if spec not in KV_SCHEMES:
        raise ValueError(f"unknown KV cache scheme '{spec}': choose {', '.join(KV_SCHEMES)}")
    return spec


def _head_dim(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _quanto(bits: int, head_dim: int):
    """Quantize-dequantize with the quantizer of transformers' quanto KV cache layer."""
    try:
        from transformers.cache_utils import QuantoQuantizedLayer
        group = next(g for g in (64, 32, 16, 8, 4, 2, 1) if head_dim % g == 0)
        layer = QuantoQuantizedLayer(nbits=bits, q_group_size=group)
    except (ImportError, ValueError) as e:
        raise EmoscopeError(f"KV cache quanto:int{bits} needs optimum-quanto>=0.2.5 (pip install optimum-quanto): "
                            f"{str(e).splitlines()[0]}") from None
    info = {"library": f"optimum-quanto {version('optimum-quanto')}", "group_size": group}
    return (lambda t: layer._dequantize(layer._quantize(t.contiguous(), axis=0)).to(t.dtype)), info


def _gguf(kind: str, head_dim: int):
    """Quantize-dequantize rows of head_dim values with the gguf package's llama.cpp quantizer."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if head_dim % 32:
        raise EmoscopeError(f"KV cache gguf:{kind}: head_dim {head_dim} is not a multiple of llama.cpp's block of 32")
    qtype = GGMLQuantizationType[kind]

    def fq(t: torch.Tensor) -> torch.Tensor:
        x = t.detach().float().cpu().numpy().reshape(-1, t.shape[-1])
        y = dequantize(quantize(np.ascontiguousarray(x), qtype), qtype).reshape(t.shape)
        return torch.from_numpy(np.ascontiguousarray(y)).to(t.device, t.dtype)
    return fq, {"library": f"gguf {version('gguf')}", "group_size": 32}


@contextmanager
def kv_cache_quantized(view, spec: str):
    """Within the block the model attends over quantized keys and values (yields what was done); its
    attention implementation is restored afterwards."""
    check_kv_cache(spec)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, dim = view.model, _head_dim(view.model)
    fq, info = _quanto(QUANTO[spec], dim) if spec in QUANTO else _gguf(spec.split(":", 1)[1], dim)
    before = model.config._attn_implementation

    def attention(module, query, key, value, attention_mask, **kwargs):
        base = (ALL_ATTENTION_FUNCTIONS[before] if before in ALL_ATTENTION_FUNCTIONS
                else sys.modules[type(module).__module__].eager_attention_forward)
        return base(module, query, fq(key), fq(value), attention_mask, **kwargs)

    name = f"emoscope_kv_{spec.replace(':', '_')}_{before}"
    AttentionInterface.register(name, attention)
    if before in ALL_MASK_ATTENTION_FUNCTIONS:  # the same padding/causal masks (a name without one gets none)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[before])
    model.set_attn_implementation(name)
    try:
        yield {"kv_cache": spec, "kv_library": info["library"], "kv_group_size": info["group_size"]}
    finally:
        model.set_attn_implementation(before)
