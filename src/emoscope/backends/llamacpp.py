"""The llama.cpp backend: the model a deployer serves, run by the runtime that serves it.

`LlamaCppModel` offers what the PyTorch `ModelView` offers the stages, computed inside llama.cpp
(llama-cpp-python's bindings, `pip install 'emoscope[llamacpp]'`):

- **score**: summed label log-probs after each prompt (`score_ids`), the shared prefix decoded once on
  sequence 0 and copied to every prompt's sequence (`llama_memory_seq_cp`, metadata only in a unified
  KV cache);
- **capture**: the residual after any layer at the answer position, read from the graph node
  `l_out-{il}` through the eval callback (`cb_eval`), which ggml calls after computing a node and
  before anything downstream reads it;
- **edit**: SAE feature ablations written into that node in place, at one row per copy of an answer
  token (`ablate_each`), so an intervention's effect is measured inside llama.cpp's own arithmetic.

Both backends are fed the same token ids (the reference's tokenizer); `check_tokens` compares them
with the GGUF's own tokenizer and refuses a disagreement. An exception inside the callback never
returns False to ggml (which would silently stop the graph): it is kept and raised after the decode.

Writing and quantizing GGUF files (the reference's F32 file, llama.cpp's types) is `backends.gguf_build`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import EmoscopeError
from .base import token_mismatch
from ..interventions.edits import clamp_rows
from ..interventions.effects import margin
from ..prefix import common_prefix as _common_prefix

INSTALL = "pip install 'emoscope[llamacpp]'"
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
"""KV-cache types (llama.cpp's --cache-type-k/-v) and their ggml type ids."""
FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_0": 8, "Q5_1": 9,
          "Q4_K_M": 15, "Q4_K_S": 14, "Q4_0": 2, "Q4_1": 3, "Q3_K_M": 12, "Q3_K_S": 11, "Q3_K_L": 13, "Q2_K": 10,
          "IQ4_XS": 30, "IQ4_NL": 25}
"""llama.cpp file types `llama_model_quantize` writes (llama_ftype), by llama-quantize's names."""
SEQ_MAX = 256  # llama.cpp's LLAMA_MAX_SEQ
_LAYER = re.compile(rb"l_out-(\d+)$")


def _lib():
    try:
        import llama_cpp
    except ImportError:
        raise EmoscopeError(f"the llama.cpp backend needs llama-cpp-python: `{INSTALL}`") from None
    return llama_cpp


def version() -> str:
    """'llama-cpp-python 0.3.36 (ggml 0.25.3)': the bindings and the library they built."""
    lib = _lib()
    libs = sorted((Path(lib.__file__).parent / "lib").glob("libggml-base.so.*.*"))
    ggml = libs[0].name.split(".so.")[-1] if libs else "unknown"
    return f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} (ggml {ggml})"


def _ggml():
    """libggml-base with the few tensor accessors the callback needs (not bound by llama-cpp-python)."""
    lib = _lib()
    folder = Path(lib.__file__).parent / "lib"
    g = ctypes.CDLL(str(next(folder.glob("libggml-base.so*"))))
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_get_data.restype, g.ggml_get_data.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    g.ggml_nrows.restype, g.ggml_nrows.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    g.ggml_is_contiguous.restype, g.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    return g


_quiet_cb = None


def _quiet(lib):
    """llama.cpp's log to nowhere unless EMOSCOPE_LLAMACPP_LOG=1 (it prints every tensor on load)."""
    global _quiet_cb
    if _quiet_cb is None and os.environ.get("EMOSCOPE_LLAMACPP_LOG") != "1":
        _quiet_cb = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_quiet_cb, ctypes.c_void_p())


class LlamaCppModel:
    """A GGUF file served by llama.cpp, with the attributes a `Task` and the audit read from a model, and the
    operations of the model interface it supports (`supports`, emoscope.backend): label scores (`score_ids`),
    the residual stream read and edited at the answer position (`answer_logits_each`, through the eval callback) and
    its tokenizer checked (`check_tokens`); no hooks at other positions or kinds, and no gradients."""

    dtype = torch.float32
    device = torch.device("cpu")
    backend = "llama.cpp"
    supports = frozenset({"score", "read_answer", "edit_answer", "check_tokens", "logits"})

    def __init__(self, path: str | Path, tokenizer, name: str, chat: bool, threads: int | None = None,
                 kv_cache: str | None = None, n_ctx: int = 8192, n_ubatch: int = 512):
        lib = self.lib = _lib()
        _quiet(lib)
        self.path, self.tokenizer, self.name, self.chat = str(path), tokenizer, name, chat
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.kv_cache, self.n_ubatch = kv_cache, n_ubatch
        if kv_cache is not None and kv_cache not in KV_TYPES:
            raise EmoscopeError(f"unknown llama.cpp kv_cache '{kv_cache}': choose {', '.join(KV_TYPES)}")
        if not Path(path).is_file():
            raise EmoscopeError(f"GGUF file not found: {path}")
        mp = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise EmoscopeError(f"llama.cpp cannot load {path}: not a GGUF model file it supports")
        self.n_layers = lib.llama_model_n_layer(self._model)
        self.d_model = lib.llama_model_n_embd(self._model)
        self.vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.max_context = int(min(lib.llama_n_ctx_train(self._model), n_ctx))
        self.file_type = _ftype_name(lib.llama_model_ftype(self._model))
        self.file_bytes = Path(path).stat().st_size
        self.weights = f"{self.file_type} GGUF ({Path(path).name}) in llama.cpp ({version()})"
        self.settings = None
        self._g = _ggml()
        self._hook = _Callback(self)
        self.n_ctx = n_ctx
        self._ctx = self._context(n_ctx)

    def _context(self, n_ctx: int):
        lib = self.lib
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, self.n_ubatch, self.n_ubatch, SEQ_MAX
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified, cp.swa_full = True, True  # rows in batch order; seq_rm valid on sliding-window layers
        cp.cb_eval, cp.cb_eval_user_data = self._hook.c_fn, None  # kept alive by self._hook
        if self.kv_cache:
            cp.type_k = cp.type_v = KV_TYPES[self.kv_cache]
            cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V cache needs it
        ctx = lib.llama_init_from_model(self._model, cp)
        if not ctx:
            raise EmoscopeError(f"llama.cpp could not create a context for {self.path} (kv_cache {self.kv_cache}; "
                                "EMOSCOPE_LLAMACPP_LOG=1 shows its log)")
        self._mem = lib.llama_get_memory(ctx)
        return ctx

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is None or getattr(lib, "llama_free", None) is None:  # interpreter shutdown
            return
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def describe(self) -> dict:
        """What ran, for a result row: runtime version, file type and size, threads, KV cache."""
        return {"runtime": version(), "file_type": self.file_type, "file_bytes": self.file_bytes,
                "threads": self.threads, "kv_cache": self.kv_cache or "f16"}

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(raw) + 8))()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, True)
        if n < 0:
            raise EmoscopeError("llama.cpp could not tokenize a prompt")
        return list(buf[:n])

    def check_tokens(self, prompts: list[str], ids: list[list[int]], labels: list[str], label_ids: list[list[int]]):
        """Refuse a GGUF whose tokenizer disagrees with the reference's on these prompts or label strings: both
        backends get the reference's ids, which would otherwise mean different text to this file."""
        wrong = token_mismatch(self.tokenize, getattr(self.tokenizer, "bos_token", None), prompts, ids, labels,
                               label_ids)
        if wrong:
            raise EmoscopeError(f"{Path(self.path).name}: llama.cpp tokenizes {wrong}: the two backends would "
                                "read different texts")

    # ------------------------------------------------------------------ decoding
    def _clear(self, first: int = 0):
        for s in range(first, SEQ_MAX):
            self.lib.llama_memory_seq_rm(self._mem, s, -1, -1)

    def _decode(self, tokens, pos, seqs, outputs, capture=(), edits=None) -> tuple[np.ndarray, dict]:
        """Decode one batch (token, position, sequence, wants-logits per row; at most n_ubatch rows), reading
        `capture` layers at the output rows and applying `edits` {layer: fn(x_rows [m, d], out_rows)}.
        Returns the logits of the output rows [m, n_vocab] and {layer: [m, d]}."""
        lib, n = self.lib, len(tokens)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[i], pos[i], 1
                batch.seq_id[i][0], batch.logits[i] = seqs[i], bool(outputs[i])
            batch.n_tokens = n
            out_rows = np.flatnonzero(np.asarray(outputs, bool))
            self._hook.arm(capture, edits or {}, out_rows, n)
            rc = lib.llama_decode(self._ctx, batch)
            self._hook.disarm()
            if rc != 0:
                raise EmoscopeError(f"llama.cpp decode failed (code {rc}): the KV cache ({lib.llama_n_ctx(self._ctx)} "
                                    "tokens) may be too small for this batch")
            logits = np.empty((len(out_rows), self.n_vocab), np.float32)
            for j, i in enumerate(out_rows):
                ptr = lib.llama_get_logits_ith(self._ctx, int(i))
                logits[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            return logits, self._hook.captured
        finally:
            lib.llama_batch_free(batch)

    def _prefill(self, prompts: list[list[int]]) -> int:
        """Each prompt on its own sequence 1..n: the common prefix decoded once on sequence 0 and copied, then each
        prompt's own tokens up to its answer token. Returns the prefix length."""
        P = _common_prefix(prompts, 1)
        self._clear()
        if P:
            self._run_rows([(t, i, 0, False) for i, t in enumerate(prompts[0][:P])])
            for s in range(1, len(prompts) + 1):
                self.lib.llama_memory_seq_cp(self._mem, 0, s, -1, -1)
        rows = [(t, P + i, s, False) for s, p in enumerate(prompts, 1) for i, t in enumerate(p[P:-1])]
        self._run_rows(rows)
        return P

    def _chunks(self, prompts, max_seqs: int, extra: int):
        """(start, prompts) chunks of at most `max_seqs` prompts whose own tokens, and `extra` more per prompt,
        fit the KV cache beside the longest prompt (an upper bound on the shared prefix)."""
        budget, i = self.n_ctx - max(len(p) for p in prompts) - 8, 0
        while i < len(prompts):
            j, used = i, 0
            while j < len(prompts) and j - i < max_seqs and (j == i or used + len(prompts[j]) + extra <= budget):
                used += len(prompts[j]) + extra
                j += 1
            yield i, prompts[i:j]
            i = j

    def _run_rows(self, rows):
        for i in range(0, len(rows), self.n_ubatch):
            chunk = rows[i:i + self.n_ubatch]
            self._decode(*zip(*chunk))

    def _answers(self, prompts, copies: int | None, capture=(), edits=None, n_sets: int = 1):
        """After `_prefill`: each prompt's answer token decoded on its own sequence (copies None,
        kept there), or `copies` times on copied sequences (row r * copies + j, removed after). Returns the output
        logits [rows, n_vocab] and captures; `edits` {layer: fn(x [rows, d] tensor, set of each row) -> delta}."""
        n, first = len(prompts), len(prompts) + 1
        if copies is None:
            rows = [(p[-1], len(p) - 1, r + 1, True) for r, p in enumerate(prompts)]
        else:
            for r in range(n):
                for j in range(copies):
                    self.lib.llama_memory_seq_cp(self._mem, r + 1, first + r * copies + j, -1, -1)
            rows = [(p[-1], len(p) - 1, first + r * copies + j, True) for r, p in enumerate(prompts)
                    for j in range(copies)]
        self._hook.set_of_row = np.tile(np.arange(copies or 1), n)
        logits, cap = self._decode(*zip(*rows), capture=capture, edits=edits)
        if copies is not None:
            self._clear(first)
        return logits, cap

    # ------------------------------------------------------------------ the stages' operations
    @torch.no_grad()
    def score_ids(self, prompts: list[list[int]], labels: list[list[int]], batch_size: int = 8, progress=None,
                  resid_layers: list[int] = ()):
        """As `task.score.score_ids`, in llama.cpp: [n, K] summed label log-probs and, with `resid_layers`, the
        answer-position residuals {layer: [n, d]} float32."""
        multi = [k for k, lab in enumerate(labels) if len(lab) > 1]
        longest = max(len(lab) for lab in labels)
        per = max(1, min((SEQ_MAX - 1) // (1 + len(multi)), self.n_ubatch // max(1, len(multi) * (longest - 1))))
        result = np.zeros((len(prompts), len(labels)))
        res = {layer: np.zeros((len(prompts), self.d_model), np.float32) for layer in resid_layers}
        for i, chunk in self._chunks(prompts, per, len(multi) * longest):
            result[i:i + len(chunk)], cap = self._score_chunk(chunk, labels, multi, list(resid_layers))
            for layer in resid_layers:
                res[layer][i:i + len(chunk)] = cap[layer]
            if progress:
                progress(len(chunk))
        return (result, res) if resid_layers else result

    def _score_chunk(self, chunk, labels, multi, layers):
        self._prefill(chunk)
        logits, cap = self._answers(chunk, None, capture=layers)
        out = _log_softmax(logits)[:, [lab[0] for lab in labels]].astype(np.float64)
        if multi:  # label tokens 2..m: each (prompt, label) on its own sequence copied from the prompt's
            n, rows, where = len(chunk), [], []
            for r, p in enumerate(chunk):
                for m, k in enumerate(multi):
                    s = n + 1 + r * len(multi) + m
                    self.lib.llama_memory_seq_cp(self._mem, r + 1, s, -1, -1)
                    rows += [(t, len(p) + j, s, True) for j, t in enumerate(labels[k][:-1])]
                    where += [(r, k, t) for t in labels[k][1:]]
            lp = _log_softmax(self._decode(*zip(*rows))[0])
            for i, (r, k, t) in enumerate(where):
                out[r, k] += lp[i, t]
        self._clear()
        return out, cap

    def token_logits(self, ids: list[int]) -> np.ndarray:
        """The next-token logits over the vocabulary at every position of one sequence [T, V] (decoded on sequence 0
        in batches of n_ubatch, the cache cleared before and after)."""
        self._clear()
        out = []
        for i in range(0, len(ids), self.n_ubatch):
            chunk = list(ids[i:i + self.n_ubatch])
            out.append(self._decode(chunk, list(range(i, i + len(chunk))), [0] * len(chunk), [True] * len(chunk))[0])
        self._clear()
        return np.concatenate(out)

    def label_logits(self, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:
        """The logits of `tokens` at each prompt's answer position [n, K] (no edit)."""
        return torch.from_numpy(self.answer_logits_each(prompts, tokens)[0])

    def ablate_each(self, saes: dict, prompts: list[list[int]], gold, tokens: list[int], sets: list[dict],
                    log_prior: torch.Tensor | None = None, baseline=None, kind: str = "best_other") -> np.ndarray:
        """Margins [len(sets), n] with each set of SAE features clamped at the answer position inside llama.cpp's
        graph (`answer_logits_each`), as `interventions.effects.ablate_each` computes them in PyTorch."""
        logits = self.answer_logits_each(prompts, tokens, len(sets), clamp_rows(saes, sets, baseline))
        g = torch.as_tensor(np.asarray(gold))
        return np.stack([margin(torch.from_numpy(lg), g, log_prior, kind).numpy() for lg in logits])

    @torch.no_grad()
    def answer_logits_each(self, prompts: list[list[int]], tokens: list[int], n_sets: int = 1,
                           edits: dict | None = None) -> np.ndarray:
        """The label tokens' logits at each prompt's answer position [n_sets, n, K], copy j of every prompt
        edited as set j: `edits` {layer: fn(x [rows, d] tensor, set index of each row [rows]) -> delta [rows, d]}
        is added to the layer's output (`l_out`) at those rows, inside llama.cpp's graph."""
        out = np.zeros((n_sets, len(prompts), len(tokens)), np.float32)
        per = max(1, (SEQ_MAX - 1) // (1 + n_sets)) if n_sets > 1 else (SEQ_MAX - 1) // 2
        for i, chunk in self._chunks(prompts, per, n_sets):
            c = len(chunk)
            step = max(1, min(n_sets, (SEQ_MAX - 1 - c) // c, self.n_ubatch // c))
            self._prefill(chunk)
            for a in range(0, n_sets, step):
                n = min(step, n_sets - a)
                self._hook.set_offset = a
                logits, _ = self._answers(chunk, n, edits=edits)
                out[a:a + n, i:i + len(chunk)] = logits[:, tokens].reshape(len(chunk), n, -1).transpose(1, 0, 2)
            self._clear()
        return out


class _Callback:
    """The eval callback: asks ggml for the `l_out-{il}` nodes of the layers to read or edit, and at each reads
    the output rows and adds the edits in place. Kept by the model for the context's whole life (a collected
    CFUNCTYPE crashes the process); an exception is kept and raised after the decode, never returned to ggml
    as False, which would stop the graph silently."""

    def __init__(self, model: LlamaCppModel):
        self.g, self.d = model._g, model.d_model
        self.c_fn = model.lib.ggml_backend_sched_eval_callback(self._call)
        self.layers, self.capture, self.edits, self.error = set(), set(), {}, None
        self.set_of_row, self.set_offset, self.captured = np.zeros(0, int), 0, {}

    def arm(self, capture, edits, out_rows: np.ndarray, n_tokens: int):
        self.capture, self.edits = set(capture), edits
        self.layers = self.capture | set(edits)
        self.out_rows, self.n_tokens, self.captured, self.error = out_rows, n_tokens, {}, None

    def disarm(self):
        self.layers, self.edits = set(), {}
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        missing = self.capture - set(self.captured)
        if missing:
            raise EmoscopeError(f"llama.cpp's graph has no node l_out for layers {sorted(missing)}")

    def _call(self, t, ask, _data):
        try:
            m = _LAYER.match(self.g.ggml_get_name(t) or b"")
            if ask:
                return bool(m) and int(m[1]) in self.layers
            if m and int(m[1]) in self.layers:
                self._at(int(m[1]), t)
        except BaseException as e:  # noqa: BLE001 - raised after the decode
            self.error = self.error or e
        return True

    def _at(self, layer: int, t):
        nrows = self.g.ggml_nrows(t)
        if not self.g.ggml_is_contiguous(t) or self.g.ggml_nbytes(t) != nrows * self.d * 4:
            raise EmoscopeError(f"l_out-{layer} is not a contiguous F32 [n_embd, rows] tensor")
        ptr = ctypes.cast(self.g.ggml_get_data(t), ctypes.POINTER(ctypes.c_float))
        x = np.ctypeslib.as_array(ptr, shape=(nrows, self.d))
        if nrows == self.n_tokens:
            rows = self.out_rows
        elif nrows == len(self.out_rows):  # the last layer keeps only the rows that output logits
            rows = np.arange(nrows)
        else:
            raise EmoscopeError(f"l_out-{layer} has {nrows} rows for a batch of {self.n_tokens} tokens")
        if layer in self.edits:
            cur = torch.from_numpy(x[rows].copy())
            delta = self.edits[layer](cur, self.set_of_row[:len(rows)] + self.set_offset)
            x[rows] += delta.detach().to(torch.float32).numpy()
        if layer in self.capture:
            self.captured[layer] = x[rows].copy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _ftype_name(code: int) -> str:
    names = {v: k for k, v in FTYPES.items()}
    return names.get(code & ~1024, f"ftype {code}")  # 1024: LLAMA_FTYPE_GUESSED
