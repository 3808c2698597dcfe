"""GGUF files for llama.cpp candidates: the reference's weights written as an F32 GGUF with the source file's metadata
and tensor names (`write_float_gguf`), and that file quantized by llama.cpp's own `llama_model_quantize` to any type
(`quantize`) or to a per-tensor mixture (`build`), every file cached by content hash under
`$EMOSCOPE_CACHE/llamacpp`. The runtime that runs them is `backends.llamacpp`."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..artifacts import cache_root, file_sha256
from ..errors import EmoscopeError
from .llamacpp import FTYPES, _lib, _quiet, version

def cache_dir() -> Path:
    return cache_root() / "llamacpp"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:20]


def write_float_gguf(src: str | Path, dst: str | Path | None = None) -> Path:
    """The GGUF `src` with every tensor dequantised to F32: the same metadata (file type F32) and tensor names, so
    llama.cpp runs exactly the weights emoscope's PyTorch reference dequantised from it. Cached by the source's
    hash; written to a temporary name and renamed, so a stopped run leaves nothing half-written."""
    import gguf
    from gguf.quants import dequantize

    src = Path(src)
    dst = Path(dst) if dst else cache_dir() / f"{file_sha256(src)[:20]}-F32.gguf"
    if dst.exists():
        return dst
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError) as e:
        raise EmoscopeError(f"cannot read GGUF {src}: {e}") from None
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, int(gguf.LlamaFileType.ALL_F32))
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, dst)
    return dst


def check_type(ftype: str, floats: bool = True) -> str:
    """A llama.cpp file type llama-quantize knows (`FTYPES`; without F32 and F16 when `floats` is off), or one line
    naming the choices. The one check of a type name: candidates, sensitivity and `quantize` call it."""
    known = [t for t in FTYPES if floats or t not in ("F32", "F16")]
    if ftype not in known:
        raise EmoscopeError(f"unknown llama.cpp type '{ftype}': choose {', '.join(known)}")
    return ftype


def quantize(src: str | Path, ftype: str, threads: int | None = None, overrides: dict[str, str] | None = None) -> Path:
    """`src` (an F32/F16 GGUF) quantized by llama.cpp's own `llama_model_quantize` to `ftype` (Q4_K_M, Q8_0, ...),
    with optional per-tensor type overrides {tensor-name regex: ggml type name}; cached by content."""
    lib = _lib()
    check_type(ftype)
    src = Path(src)
    key = _digest(file_sha256(src), ftype, sorted((overrides or {}).items()), version())
    dst = cache_dir() / f"{key}-{ftype}.gguf"
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    _quiet(lib)
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[ftype], threads or (os.cpu_count() or 1)
    keep = _tensor_overrides(lib, params, overrides or {})
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise EmoscopeError(f"llama.cpp could not quantize {src.name} to {ftype} (code {rc})")
    os.replace(tmp, dst)
    return dst


def _tensor_overrides(lib, params, overrides: dict[str, str]):
    """Per-tensor types for llama_model_quantize (`llama-quantize --tensor-type PATTERN=TYPE`); returns the
    ctypes objects that must outlive the call."""
    if not overrides:
        return None
    import gguf

    arr = (lib.llama_model_tensor_override * (len(overrides) + 1))()
    names = []
    for i, (pattern, type_name) in enumerate(overrides.items()):
        try:
            code = int(gguf.GGMLQuantizationType[type_name.upper()])
        except KeyError:
            raise EmoscopeError(f"unknown ggml tensor type '{type_name}' for '{pattern}'") from None
        names.append(ctypes.create_string_buffer(pattern.encode()))
        arr[i].pattern, arr[i].type = ctypes.cast(names[-1], ctypes.c_char_p), code
    params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_tensor_override))
    return arr, names


def tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's ggml type in a GGUF file ({name: 'Q4_K', ...}): what llama.cpp's mixture for a type gave it."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def build(src: str | Path, types: dict[str, str], threads: int | None = None) -> Path:
    """`src` (an F32 GGUF) with every tensor at the type `types` names for it (a mixed-precision file, as
    `llama-quantize --tensor-type` makes), by llama.cpp's quantizer; tensors not named keep their type."""
    quantized = sorted({t for t in types.values() if t not in ("F32", "F16", "BF16")})
    ftype = "Q8_0" if not quantized else next((f for f in FTYPES if f == quantized[0]), "Q8_0")
    return quantize(src, ftype, threads, {f"^{re.escape(name)}$": t for name, t in sorted(types.items())})
