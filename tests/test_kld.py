"""llama-perplexity's KL-divergence statistics (deployment/kld.py): the stored base as llama.cpp stores it, every
statistic against an independent computation, WikiText-2 windows as llama-perplexity cuts them, and the same
figures from both runtimes on one file."""

import numpy as np
import pytest

from emoscope.deployment import kld
from emoscope.errors import EmoscopeError


def _softmax_logp(x):
    x = x.astype(np.float64)
    return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))


class _Fixed:
    """A 'model' whose logits on a window are given."""

    def __init__(self, logits):
        self.logits = logits

    def token_logits(self, ids):
        return self.logits[tuple(ids)]


def _planted(n_ctx=64, vocab=50, windows=3, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    wins = [list(rng.integers(0, vocab, n_ctx)) for _ in range(windows)]
    base = {tuple(w): rng.normal(0, 3, (n_ctx, vocab)).astype(np.float32) for w in wins}
    cand = {k: (v + rng.normal(0, noise, v.shape)).astype(np.float32) for k, v in base.items()}
    return wins, base, cand


def test_statistics_match_an_independent_float64_computation():
    wins, base, cand = _planted()
    b = kld.base(_Fixed(base), wins)
    got = kld.measure(b, _Fixed(cand))
    # the same figures in float64 from the unquantized distributions, second half of each window scored
    kl, dp, nll, nll_b, same = [], [], [], [], []
    for w in wins:
        lp, lq = _softmax_logp(base[tuple(w)])[32:63], _softmax_logp(cand[tuple(w)])[32:63]
        t = np.array(w[33:])
        kl.append((np.exp(lp) * (lp - lq)).sum(1))
        r = np.arange(len(t))
        nll.append(-lq[r, t]), nll_b.append(-lp[r, t]), dp.append(np.exp(lq[r, t]) - np.exp(lp[r, t]))
        same.append(lq.argmax(1) == lp.argmax(1))
    kl, dp, nll, nll_b, same = map(np.concatenate, (kl, dp, nll, nll_b, same))
    n = len(kl)
    assert got.n == n == 3 * 31
    # 16-bit storage of the base and the -16 floor cost less than 1e-3 nats per token
    assert abs(got.mean_kld - kl.mean()) < 1e-3 and got.mean_kld > 0.01
    assert abs(got.mean_kld_err - kl.std() / np.sqrt(n - 1)) < 1e-3
    assert abs(got.kld_99 - np.percentile(kl, 99)) < 2e-3 and abs(got.max_kld - kl.max()) < 2e-3
    assert abs(got.median_kld - np.median(kl)) < 1e-3
    assert got.same_top_p == pytest.approx(same.mean())
    assert got.same_top_p_err == pytest.approx(np.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))
    assert got.ln_ppl_ratio == pytest.approx(nll.mean() - nll_b.mean(), abs=1e-3)
    assert got.ppl_ratio == pytest.approx(np.exp(nll.mean() - nll_b.mean()), abs=1e-3)
    d = nll - nll_b  # the error of a mean of paired differences
    assert got.ln_ppl_ratio_err == pytest.approx(d.std() / np.sqrt(n - 1), rel=0.02)
    assert got.mean_dp == pytest.approx(dp.mean(), abs=1e-4)
    assert got.rms_dp == pytest.approx(np.sqrt((dp ** 2).mean()), abs=1e-4)


def test_a_build_identical_to_the_base_has_no_divergence():
    wins, base, _ = _planted()
    got = kld.measure(kld.base(_Fixed(base), wins), _Fixed(base))
    assert abs(got.mean_kld) < 1e-5 and got.same_top_p == 1.0 and abs(got.ln_ppl_ratio) < 1e-4
    assert got.rms_dp < 1e-4
    # a worse build diverges more, on every figure
    _, _, near = _planted(noise=0.1)
    _, _, far = _planted(noise=1.0)
    a, b = (kld.measure(kld.base(_Fixed(base), wins), _Fixed(c)) for c in (near, far))
    assert a.mean_kld < b.mean_kld and a.rms_dp < b.rms_dp and a.same_top_p >= b.same_top_p


def test_the_stored_base_is_llama_perplexitys():
    """Per row: scale = (top - floor) / 65535 with the floor 16 nats under the top (or the row's minimum), steps
    rounded to nearest, values at or under the floor stored as step 0."""
    x = np.array([[0.0, -1.0, -20.0, 2.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    scale, floor, steps = kld.compress(x)
    assert scale[0] == pytest.approx(16 / 65535) and scale[1] == 0
    lse = np.log(np.exp(x[0] - 2).sum())
    assert floor[0] == pytest.approx(-16 - lse, abs=1e-5)
    assert steps[0, 2] == 0 and steps[0, 3] == 65535 and steps[0, 0] == round(14 / (16 / 65535))
    assert (steps[1] == 0).all()
    logp = scale[0] * steps[0].astype(np.float32) + floor[0]
    np.testing.assert_allclose(logp[[0, 1, 3]], _softmax_logp(x)[0, [0, 1, 3]], atol=2e-4)


def test_windows_are_cut_as_llama_perplexity_cuts_them(tiny_llama, shared_data):
    tok = tiny_llama.tokenizer
    cfg = kld.KLDConfig(chunks=3, n_ctx=32)
    wins = kld.windows(tok, cfg, shared_data)
    assert [len(w) for w in wins] == [32, 32, 32]
    text = kld._wikitext_test(shared_data)[:20000]
    stream = tok(text, add_special_tokens=True, split_special_tokens=True).input_ids
    assert tok.unk_token_id not in stream[1:] and "<unk>" in text  # special-token strings stay text
    first = [tok.bos_token_id] if stream[0] == tok.bos_token_id else []  # a BOS starts every window, as it starts
    assert wins[0] == stream[:32] and wins[2][len(first):] == stream[64 + len(first):96]  # the stream
    assert wins[1] == first + stream[32 + len(first):64]
    with pytest.raises(EmoscopeError, match="fewer than kld.chunks x kld.n_ctx"):
        kld.windows(tok, kld.KLDConfig(chunks=10 ** 6, n_ctx=512), shared_data)
    with pytest.raises(EmoscopeError, match="at least two scored tokens"):
        kld.summarize({k: np.zeros(1) for k in ("kld", "dp", "nll", "nll_base", "same_top")})


def test_both_runtimes_give_the_same_figures_on_one_file(tmp_path):
    """The tiny GGUF in PyTorch and in llama.cpp: next-token logits agree at every position, so a build measured
    against each runtime's own base gives nearly the same statistics; llama.cpp's Q4_0 of it diverges from its F32
    more than its Q8_0 does."""
    pytest.importorskip("llama_cpp")
    from emoscope.backends import gguf_build
    from emoscope.backends.llamacpp import LlamaCppModel
    from emoscope.models import load_model
    from tiny import tiny_gguf

    path = tiny_gguf(tmp_path / "tiny.gguf")
    ref = load_model(str(path))
    lm = load_model(str(path), backend="llama.cpp", threads=2)
    rng = np.random.default_rng(0)
    wins = [list(rng.integers(3, 200, 64)) for _ in range(2)]
    a, b = ref.token_logits(wins[0]), lm.token_logits(wins[0])
    assert a.shape == b.shape and np.abs(a - b).max() < 0.05
    f32 = gguf_build.write_float_gguf(path)
    base = kld.base(LlamaCppModel(f32, ref.tokenizer, "tiny", ref.chat, 2), wins)
    q8, q4 = (kld.measure(base, LlamaCppModel(gguf_build.quantize(f32, t, 2), ref.tokenizer, "tiny", ref.chat, 2))
              for t in ("Q8_0", "Q4_0"))
    assert 0 <= q8.mean_kld < q4.mean_kld and q8.same_top_p >= q4.same_top_p
    torch_base = kld.measure(kld.base(ref, wins), lm)  # llama.cpp's F32 arithmetic against PyTorch's
    assert torch_base.mean_kld < q4.mean_kld
