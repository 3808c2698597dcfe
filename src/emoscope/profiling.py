"""Where a stage's time goes: wall seconds by kind of work, written into each stage's `timing.json`
under `profile`.

Sections are exclusive: time spent in a section opened inside another counts for the inner one only
(unless the outer one is a finer kind of the same work: `llm_forward` inside `llm_forward:prefix`
counts as the latter), so the kinds add up to the stage's wall time, with what no section claims
left as `other` (Python, tokenising, pandas). Kinds used across the package:

- `llm_forward`: the language model's decoder stack and unembedding (timed by module hooks that
  `instrument` puts on a model; every forward counts, whoever runs it); `llm_forward:prefix` the
  cached prompt prefixes of answer passes (`interventions.answers`), `llm_forward:sae_quality` the SAE
  stage's held-out evaluation;
- `llm_backward`: gradients through the language model (attribution);
- `sae`: SAE encode/decode outside training; `sae_train`: SAE optimiser steps;
- `statistics`: bootstraps and rank tests; `statistics:probes` the cross-validated probes,
  `statistics:subsamples` the phases stage's per-layer statistics on each subsample;
- `io`: reading and writing result files and activation stores.

Only the main thread is timed; the cost is two clock reads per section.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from functools import wraps

_stack: list[list] = []  # [kind, time the innermost open section last resumed]
_totals: dict[str, float] = {}
_main = threading.main_thread()


def _enter(kind: str) -> None:
    if threading.current_thread() is not _main:
        return
    if _stack and _stack[-1][0].startswith(kind + ":"):  # inside a finer kind of the same work: keep it
        kind = _stack[-1][0]
    now = time.perf_counter()
    if _stack:  # pause the enclosing section
        outer = _stack[-1]
        _totals[outer[0]] = _totals.get(outer[0], 0.0) + now - outer[1]
    _stack.append([kind, now])


def _exit() -> None:
    if threading.current_thread() is not _main or not _stack:
        return
    now = time.perf_counter()
    kind, start = _stack.pop()
    _totals[kind] = _totals.get(kind, 0.0) + now - start
    if _stack:
        _stack[-1][1] = now  # resume the enclosing section


@contextmanager
def section(kind: str):
    """Count the wall time of the block for `kind` (exclusive of sections opened inside it)."""
    _enter(kind)
    try:
        yield
    finally:
        _exit()


def timed(kind: str):
    """Decorator: every call of the function is a `kind` section."""
    def wrap(fn):
        @wraps(fn)
        def inner(*args, **kwargs):
            with section(kind):
                return fn(*args, **kwargs)
        return inner
    return wrap


@contextmanager
def collect():
    """Profile a block: yields a dict filled on exit with seconds per kind and `other` (the rest of
    the block's wall time), each rounded to 0.01 s."""
    out: dict[str, float] = {}
    saved = dict(_totals)
    _totals.clear()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        wall = time.perf_counter() - t0
        spent = dict(_totals)
        _totals.clear()
        for kind, s in saved.items():  # an enclosing collect keeps what it had
            _totals[kind] = _totals.get(kind, 0.0) + s + spent.get(kind, 0.0)
        for kind, s in spent.items():
            _totals.setdefault(kind, s)
        out.update({k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])})
        out["other"] = round(max(wall - sum(spent.values()), 0.0), 2)


def instrument(model, modules) -> None:
    """Time every forward of the given submodules of `model` (its decoder stack, its unembedding) as
    `llm_forward`; done once per model."""
    if getattr(model, "_emoscope_profiled", False):
        return
    for m in modules:
        m.register_forward_pre_hook(lambda *_: _enter("llm_forward"))
        m.register_forward_hook(lambda *_: _exit(), always_call=True)
    model._emoscope_profiled = True
