"""Every candidate build the audit, sensitivity and the canary compare with the reference, in one place.

A `Candidate` names what changes against the reference: the prompt (template, demonstrations, text noise), the
weights (a precision: round-to-nearest simulation, a llama.cpp type through the gguf package or through llama.cpp's
own quantizer, a library's kernels), the KV cache, another file of the same model, and the runtime that computes it
(transformers or llama.cpp). This module validates them, says their bits (`bits`), and builds the task a candidate
runs as (`candidate_task`); nothing else parses a precision string.
"""

from __future__ import annotations

import random
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .. import quantization
from ..backends import gguf_build, llamacpp
from ..backends.base import Runtime
from ..constraints import Name, Seed, Threads
from ..errors import EmoscopeError
from ..interventions.kv_cache import check_kv_cache, kv_cache_quantized
from ..interventions.perturb import PRECISIONS, check_precision, perturb_text, precision_applied, template_variants
from ..models import ModelConfig, ModelView, gguf_source, load_model
from ..task import Task, TaskConfig
from ..task.prompts import Template


LLAMACPP, GGUF = "llama.cpp:", "gguf:"
"""Prefixes of a precision: a type made by llama.cpp's own quantizer, or the same type through the gguf package."""
SOURCE = "source"
"""`model: source` of a llama.cpp candidate: the GGUF file the reference was dequantised from, run as it is."""
PARITY = "llama.cpp_F32"
"""The candidate every llama.cpp row is read beside: the reference's own weights (F32 GGUF) in llama.cpp, so a row
separates llama.cpp's arithmetic (activations quantized for its dot products, f16 KV cache, its attention) from
the bits of its weights."""


def _known_precision(v: str) -> str:
    try:
        return LLAMACPP + gguf_build.check_type(v[len(LLAMACPP):]) if v.startswith(LLAMACPP) else check_precision(v)
    except EmoscopeError as e:
        raise ValueError(str(e)) from None


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Name
    """Label of the candidate in tables and file names (no slash)."""
    template: Template | None = None
    """Prompt template replacing the reference's."""
    shots: int | None = Field(None, ge=0)
    """Number of demonstrations replacing the reference's."""
    demo_seed: Seed | None = None
    """Seed drawing other demonstrations."""
    text: Literal["lower", "upper", "whitespace", "typos"] | None = None
    """Noise applied to every input text."""
    precision: Annotated[str, AfterValidator(_known_precision)] | None = None
    """Weight precision: float32, bfloat16, float16, weight-only RTN int8 / int4 / int3, a llama.cpp type
    through the gguf package (gguf:Q8_0, gguf:Q5_1, gguf:Q5_0, gguf:Q4_1, gguf:Q4_0, ...), or a library's
    kernels on load (torchao:int8|int4, quanto:int8|int4|float8, bnb:int8|nf4 on CUDA)."""
    model: str | None = None
    """Another checkpoint of the same model (same tokenizer), e.g. a quantized export; with runtime llama.cpp, a
    .gguf file or `source` (the reference's own GGUF file as shipped)."""
    kv_cache: str | None = None
    """Quantized KV cache: every attention reads its keys and values through the cache's quantizer
    (quanto:int4|int2 as transformers' QuantizedCache, gguf:Q8_0|Q4_0|Q4_1|Q5_0|Q5_1 as llama.cpp's
    --cache-type-k/-v emulated in PyTorch); with runtime llama.cpp, llama.cpp's own cache: f16, q8_0 or q4_0."""
    runtime: Runtime | None = Field(None, exclude_if=lambda v: v is None)
    """Where the candidate runs: transformers (PyTorch, the default) or llama.cpp itself (scoring, SAE features and
    ablations read inside llama.cpp; `pip install 'emoscope[llamacpp]'`): the reference's weights as an F32 GGUF,
    or `model` (a .gguf file as shipped). A precision llama.cpp:TYPE implies it."""
    threads: Threads | None = Field(None, exclude_if=lambda v: v is None)
    """CPU threads of a llama.cpp candidate (unset: every core); recorded in its row."""

    @model_validator(mode="after")
    def _runtime_fields(self):
        built = self.built_by_llamacpp
        if built and self.runtime is None:
            self.runtime = "llama.cpp"
        if built and self.model is not None:
            raise ValueError(f"precision {self.precision} quantizes the reference's weights: give it or a model, "
                             "not both")
        if self.runtime == "llama.cpp":
            if self.precision and not built:
                raise ValueError("runtime llama.cpp takes a precision llama.cpp:TYPE (Q8_0, Q4_K_M, ...), not "
                                 f"{self.precision}")
            if self.kv_cache is not None and self.kv_cache not in llamacpp.KV_TYPES:
                raise ValueError(f"llama.cpp kv_cache '{self.kv_cache}': choose {', '.join(llamacpp.KV_TYPES)}")
            if self.model is not None and self.model != SOURCE and not self.model.endswith(".gguf"):
                raise ValueError(f"a llama.cpp model is a .gguf file (or '{SOURCE}', the reference's own GGUF as "
                                 f"shipped), not {self.model}")
        else:
            if self.threads is not None:
                raise ValueError("threads is a setting of runtime llama.cpp")
            if self.kv_cache is not None:
                check_kv_cache(self.kv_cache)
        return self

    @property
    def built_by_llamacpp(self) -> bool:
        """Whether the weights are the reference's, quantized by llama.cpp's own quantizer (precision llama.cpp:T)."""
        return bool(self.precision and self.precision.startswith(LLAMACPP))

    @property
    def changes_model(self) -> bool:
        """Whether the model's arithmetic changes (weights, KV cache, another file or runtime), not only its input."""
        return bool(self.precision or self.model or self.kv_cache or self.runtime == "llama.cpp")

    @property
    def library(self) -> bool:
        """Whether the weights are loaded quantized by a library's own kernels (torchao, quanto, bitsandbytes)."""
        return self.precision in quantization.SCHEMES

    @property
    def simulated(self) -> bool:
        """Whether the precision is simulated on the loaded weights in place (RTN, a gguf type, a float dtype)."""
        return bool(self.precision) and not self.library and not self.built_by_llamacpp


class Bits(NamedTuple):
    """Bits per weight and per KV-cache value of a candidate's format (None: the reference's, or not a format)."""
    weights: int | None
    kv_cache: int | None


_BITS = re.compile(r"(?:IQ|Q|int|float|nf|F|f|q)(\d+)")


def _bits(spec: str | None) -> int | None:
    if spec is None:
        return None
    kind = spec.split(":", 1)[-1]
    if kind in ("bfloat16", "float16"):
        return 16
    m = _BITS.match(kind)
    return int(m.group(1)) if m else None


def bits(cand: Candidate) -> Bits:
    """The nominal bits of a candidate's weight format and KV cache, read from the format's name in every registry
    (RTN int8 → 8, llama.cpp / gguf Q8_0 → 8, Q4_K_M → 4, IQ4_XS → 4, torchao/quanto/bnb int8 → 8, nf4 → 4, float8 →
    8; a cache q8_0 / gguf:Q8_0 / quanto:int8 → 8)."""
    return Bits(_bits(cand.precision), _bits(cand.kv_cache))


def default_candidates(ev_cfg: TaskConfig, labels: list[str], seed: int) -> list[Candidate]:
    out = [Candidate(name=n, template=t) for n, t in template_variants(ev_cfg.template, labels, seed).items()]
    k = ev_cfg.shots
    out += [Candidate(name="demos_removed" if k else "demos_added", shots=0 if k else len(labels)),
            Candidate(name="demos_changed", shots=max(k, len(labels)), demo_seed=seed + 101)]
    out += [Candidate(name=f"text_{t}", text=t) for t in ("lower", "upper", "whitespace", "typos")]
    out += [Candidate(name=p, precision=p) for p in PRECISIONS if p != "float32"]
    return out


def candidates(cfg, ev_cfg: TaskConfig, labels: list[str]) -> list[Candidate]:
    """The candidates an audit runs (`cfg`: its `deployment.config.AuditConfig`): the configured ones (or the defaults),
    with the llama.cpp parity candidate first when some candidate runs in llama.cpp and none is the reference's
    weights there already."""
    cands = default_candidates(ev_cfg, labels, cfg.seed) if cfg.candidates == "default" else list(cfg.candidates)
    runtime = [c for c in cands if c.runtime == "llama.cpp"]
    if runtime:
        llamacpp.version()  # the extra is installed, or one line naming the install command
        if not any(is_parity(c) for c in runtime):
            cands.insert(cands.index(runtime[0]), Candidate(name=PARITY, runtime="llama.cpp"))
    return cands


def is_parity(c: Candidate) -> bool:
    """Whether a candidate is the reference's own weights in llama.cpp, as they are (the parity row)."""
    plain = c.template is None and c.shots is None and c.demo_seed is None and c.text is None
    return plain and c.model is None and c.kv_cache in (None, "f16") and c.precision in (None, "llama.cpp:F32")


@contextmanager
def candidate_task(cand: Candidate, task: Task, texts: list[str], cfg, load_view=None):
    """Within the block: the candidate's task (prompt, demonstrations, model) and input texts (`texts` with the
    candidate's noise), and what was done to the model (`cfg`: the audit's `AuditConfig`, for its seed and RTN group
    size). A precision change applies to the reference task's loaded
    weights in place and is undone afterwards (one model in memory); a `model` candidate is loaded beside it."""
    view, weights = _backend(cand, task.model, load_view or reloader(task.model))
    changes = {k: v for k, v in (("template", cand.template), ("shots", cand.shots), ("seed", cand.demo_seed))
               if v is not None}
    if cand.text is not None:
        r = random.Random(cfg.seed)
        texts = [perturb_text(t, cand.text, r) for t in texts]
    if cand.runtime == "llama.cpp":
        variant = task.variant(model=view, **changes)
        view.check_tokens([variant.prompt(t) for t in texts], variant.encode_all(texts),
                          variant.builder.label_strings(), variant.label_ids)
    precision = precision_applied(view, cand.precision, cfg.group_size) if cand.simulated else nullcontext({})
    emulated_kv = cand.kv_cache and cand.runtime != "llama.cpp"  # llama.cpp's own cache is set on its context
    kv = kv_cache_quantized(view, cand.kv_cache) if emulated_kv else nullcontext({})
    with precision as info, kv as kv_info:
        yield task.variant(model=view, **changes), texts, {**weights, **info, **kv_info}


def _backend(cand: Candidate, base: ModelView, load_view) -> tuple:
    """The model a candidate runs on (the reference's own, a file loaded beside it, or llama.cpp), and its row's
    description of the weights."""
    if cand.runtime == "llama.cpp":
        view = _llamacpp_view(cand, base)
        return view, {"weights": view.weights, **view.describe(), "parity_of_runtime": is_parity(cand)}
    if cand.model is not None or cand.built_by_llamacpp:
        # llama.cpp's quantized file dequantised into PyTorch: the same bits in float arithmetic (its emulation)
        path = str(_llamacpp_file(cand, base)) if cand.model is None else cand.model
        view = load_view(path)
        if view.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise EmoscopeError(f"candidate {cand.name}: {cand.model} has another tokenizer than the reference; "
                                "features could not be aligned, so it cannot be audited against it")
        if cand.library:
            raise EmoscopeError(f"candidate {cand.name}: give a model file or a library precision, not both")
        return view, {"weights": view.weights or cand.model}  # e.g. the Q4_K_M GGUF a team ships
    if cand.library:  # the library's own kernels: the reference's weights loaded quantized
        view = _quantized(base, cand.precision)
        q = quantization.describe(view.model, cand.precision)
        return view, {"weights": view.weights, "library": q["library"], "kernels": q["kernels"]}
    return base, {}


def _quantized(view: ModelView, spec: str) -> ModelView:
    """The reference's weights, loaded where it runs, quantized by a library on load."""
    settings = view.settings or ModelConfig(name=view.path or view.name, device=str(view.device))
    return load_model(settings.model_copy(update={"quantization": spec, "device_map": None}))


def reloader(view: ModelView) -> Callable[[str], ModelView]:
    """Loads a `model` candidate where and as the reference was loaded (float32 unless told otherwise)."""
    def load(name: str) -> ModelView:
        settings = view.settings or ModelConfig(device=str(view.device))
        return load_model(settings.model_copy(update={"name": name, "dtype": "float32"}))
    return load


def reference_in_llamacpp(base: ModelView, threads: int | None = None):
    """The reference's own weights (its F32 GGUF) in llama.cpp: the parity model, and the base of llama.cpp rows'
    KL divergence."""
    return _llamacpp_view(Candidate(name=PARITY, runtime="llama.cpp", threads=threads), base)


def _llamacpp_view(cand: Candidate, base: ModelView):
    """The candidate's GGUF in llama.cpp, fed the reference's token ids: a file as shipped, or the reference's own
    weights as an F32 GGUF (the same metadata and tensor names as its source file), quantized by llama.cpp."""
    path = Path(cand.model).expanduser() if cand.model not in (None, SOURCE) else _llamacpp_file(cand, base)
    return llamacpp.LlamaCppModel(path, base.tokenizer, base.name, base.chat, cand.threads, cand.kv_cache)


def _llamacpp_file(cand: Candidate, base: ModelView) -> Path:
    """The reference's GGUF as shipped (`model: source`), or its weights as an F32 GGUF quantized by llama.cpp to
    the candidate's type (cached by content)."""
    name = base.settings.name if base.settings is not None else base.name
    source = gguf_source(name)
    if source is None:
        raise EmoscopeError(f"candidate {cand.name}: a llama.cpp build of the reference needs the reference loaded "
                            f"from a GGUF file or a registry model, and '{name}' is neither (convert it with "
                            "llama.cpp's convert_hf_to_gguf.py and audit the file as `model:`)")
    if cand.model == SOURCE:
        return source[0]
    path = gguf_build.write_float_gguf(source[0])
    ftype = (cand.precision or "llama.cpp:F32")[len(LLAMACPP):]
    return path if ftype == "F32" else gguf_build.quantize(path, ftype, cand.threads)
