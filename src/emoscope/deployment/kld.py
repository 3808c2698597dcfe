"""The figures deployers already check: llama-perplexity's KL-divergence statistics of a build against the reference.

`llama-perplexity --kl-divergence` (llama.cpp's tools/perplexity) is the standard quality figure of a quantized GGUF:
WikiText-2 test text cut into windows of `n_ctx` tokens (BOS first when the vocabulary adds one), every position's
next-token distribution computed, and the second half of each window scored (positions n_ctx/2 .. n_ctx-2 predicting
the next token). The base distribution is stored as it stores it (`compress`: log-probs within 16 nats of the top,
16-bit steps) and every statistic is computed as it computes it (`summarize`):

- KL divergence per token, sum over the tokens whose base log-prob exceeds -16 of p_base (log p_base - log q); its
  mean with the standard error sqrt((E[x^2] - E[x]^2) / (n - 1)), maximum, 99.9/99/95/90 % percentiles (linear
  interpolation between sorted values) and median;
- "same top p": how often the build's most likely token is the base's, with its binomial error;
- ln(PPL(Q)/PPL(base)) with its error from both variances and their covariance, and the PPL ratio;
- Δp = p(next token) under the build minus under the base: its mean and its RMS with their errors.

A backend computes its logits at every position of a window (`token_logits`), so a llama.cpp row is measured in
llama.cpp against the reference's F32 GGUF in llama.cpp, and a PyTorch row in PyTorch against the PyTorch reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..data import data_dirs
from ..errors import EmoscopeError

FLOOR = -16.0
"""Base log-probs at or below this are left out of the KL sum (and stored as the floor), as llama-perplexity does."""


class KLDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    chunks: int = Field(8, ge=1)
    """WikiText-2 test windows (each scores n_ctx/2 - 1 tokens: 8 x 255 = 2,040 at 512)."""
    n_ctx: int = Field(512, ge=16)
    """Tokens per window (llama-perplexity's -c; 512 is its default)."""


class KLDStats(NamedTuple):
    """llama-perplexity's KL-divergence statistics of a build against the base, over `n` scored tokens."""
    n: int
    mean_kld: float
    mean_kld_err: float
    max_kld: float
    kld_99_9: float
    kld_99: float
    kld_95: float
    kld_90: float
    median_kld: float
    same_top_p: float
    same_top_p_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    mean_dp: float
    mean_dp_err: float
    rms_dp: float
    rms_dp_err: float


class Base(NamedTuple):
    """The base's next-token log-probs on the scored positions of every window, stored as llama-perplexity stores
    them: per row a scale, the floor's log-prob and 16-bit steps above it."""
    windows: list[list[int]]
    scale: list[np.ndarray]  # per window [m]
    floor: list[np.ndarray]  # per window [m]
    steps: list[np.ndarray]  # per window [m, V] uint16


def windows(tokenizer, config: KLDConfig, data_dir=None) -> list[list[int]]:
    """`chunks` windows of `n_ctx` tokens of WikiText-2 test as llama-perplexity cuts them: the raw file tokenized
    once (a BOS first when the tokenizer adds one), consecutive windows, each window's first token the BOS."""
    text = _wikitext_test(data_dir)
    need = config.chunks * config.n_ctx
    # special-token strings in the text ("<unk>" is all over WikiText-2) stay text, as llama-perplexity tokenizes them
    # (parse_special off): read as the special token they are input the model never saw in training (Gemma-3-270M's
    # perplexity on the first window: 29.5 against 7.1)
    ids = tokenizer(text[:need * 12], add_special_tokens=True, split_special_tokens=True).input_ids
    if len(ids) < need:
        ids = tokenizer(text, add_special_tokens=True, split_special_tokens=True).input_ids
    if len(ids) < need:
        raise EmoscopeError(f"WikiText-2 test gives {len(ids)} tokens, fewer than kld.chunks x kld.n_ctx = {need}")
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None
    out = [ids[i * config.n_ctx:(i + 1) * config.n_ctx] for i in range(config.chunks)]
    return [[bos, *w[1:]] if bos is not None else w for w in out]


def _wikitext_test(data_dir=None) -> str:
    for d in data_dirs(data_dir):
        f = Path(d) / "wikitext2" / "test.txt"
        if f.is_file():
            return f.read_text(encoding="utf-8")
    raise EmoscopeError(f"WikiText-2 test not found under {', '.join(map(str, data_dirs(data_dir)))}")


def _scored(logits: np.ndarray) -> np.ndarray:
    """The rows llama-perplexity scores: positions n_ctx/2 .. n_ctx-2 (each predicting the next token)."""
    n = len(logits)
    return logits[n // 2:n - 1]


def compress(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of logits [m, V] as llama-perplexity stores the base: (scale [m], floor log-prob [m], steps [m, V])."""
    x = logits.astype(np.float32)
    top = x.max(1)
    low = np.maximum(x.min(1), top + np.float32(FLOOR))
    lse = np.log(np.exp(x - top[:, None]).sum(1, dtype=np.float64)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    steps = np.where(x > low[:, None], np.rint(inv[:, None] * (x - low[:, None])), 0).astype(np.uint16)
    return scale, (low - top - lse).astype(np.float32), steps


def base(model, windows_: list[list[int]]) -> Base:
    """The base model's stored next-token log-probs on every window (`model.token_logits`)."""
    parts = [compress(_scored(model.token_logits(w))) for w in windows_]
    return Base(windows_, *(list(p) for p in zip(*parts)))


def per_token(b: Base, i: int, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Window i's per-token figures of a build's logits [n_ctx, V] against the base: KL, Δp, both NLLs, same top."""
    x = _scored(logits).astype(np.float32)
    target = np.asarray(b.windows[i][len(b.windows[i]) // 2 + 1:])
    top = x.max(1)
    lse = np.log(np.exp(x - top[:, None]).sum(1, dtype=np.float64)).astype(np.float32)
    logq = x - (top + lse)[:, None]
    logp = b.scale[i][:, None] * b.steps[i] + b.floor[i][:, None]
    rows = np.arange(len(x))
    kl = np.where(logp > FLOOR, np.exp(logp) * (logp - logq), 0).sum(1, dtype=np.float64)
    nll, nll_base = -logq[rows, target].astype(np.float64), -logp[rows, target].astype(np.float64)
    return {"kld": kl, "dp": np.exp(-nll) - np.exp(-nll_base), "nll": nll, "nll_base": nll_base,
            "same_top": x.argmax(1) == logp.argmax(1)}


def measure(b: Base, model) -> KLDStats:
    """A build's statistics against the base on the base's windows."""
    tokens = [per_token(b, i, model.token_logits(w)) for i, w in enumerate(b.windows)]
    return summarize({k: np.concatenate([t[k] for t in tokens]) for k in tokens[0]})


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    n, f = len(x), float(x.mean())
    var = float((x * x).mean()) - f * f
    return f, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def _percentile(sorted_: np.ndarray, fraction: float) -> float:
    p = fraction * (len(sorted_) - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_[i] + (p - i) * sorted_[min(i + 1, len(sorted_) - 1)])


def summarize(t: dict[str, np.ndarray]) -> KLDStats:
    """llama-perplexity's statistics from per-token figures (see the module's docstring)."""
    n = len(t["kld"])
    if n < 2:
        raise EmoscopeError("KL-divergence statistics need at least two scored tokens (raise kld.n_ctx)")
    kld = np.sort(t["kld"])
    mean, err = _mean_err(t["kld"])
    (lq, lq_err), (lb, lb_err) = _mean_err(t["nll"]), _mean_err(t["nll_base"])
    cov = (float((t["nll"] * t["nll_base"]).mean()) - lq * lb) / (n - 1) if n >= 10 else 0.0
    ln_ratio, ln_err = lq - lb, float(np.sqrt(max(lq_err ** 2 + lb_err ** 2 - 2 * cov, 0.0)))
    dp, dp_err = _mean_err(t["dp"])
    mse, mse_err = _mean_err(t["dp"] ** 2)
    rms = float(np.sqrt(mse))
    same = float(t["same_top"].mean())
    median = float(kld[n // 2] if n % 2 else 0.5 * (kld[n // 2] + kld[n // 2 - 1]))
    return KLDStats(n, mean, err, float(kld[-1]), _percentile(kld, 0.999), _percentile(kld, 0.99),
                    _percentile(kld, 0.95), _percentile(kld, 0.90), median, same,
                    float(np.sqrt(same * (1 - same) / (n - 1))), ln_ratio, ln_err, float(np.exp(ln_ratio)),
                    float(np.exp(ln_ratio) * ln_err), dp, dp_err, rms, (0.5 / rms * mse_err) if rms > 0 else 0.0)
