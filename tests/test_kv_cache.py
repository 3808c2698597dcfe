"""Quantized KV cache candidates (`interventions.kv_cache`) on tiny models: every position reads
quantized keys and values, the cached-prefix passes agree with whole prompts, and the model is restored."""

import numpy as np
import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.interventions.answers import AnswerBatch, answer_batches, prompt_batches
from emoscope.interventions.effects import ablate
from emoscope.interventions.kv_cache import KV_SCHEMES, check_kv_cache, kv_cache_quantized
from emoscope.sae import SAE, SAEConfig
from tiny import CORPUS, tiny_model

pytest.importorskip("optimum.quanto")


def _logits(view, ids):
    with torch.no_grad():
        return view.model(input_ids=ids).logits


@pytest.fixture(scope="module")
def wide():
    """head_dim 32: llama.cpp's block of 32 fits (the default tiny model has head_dim 8)."""
    return tiny_model("llama", n_heads=1)


def test_every_position_reads_quantized_states_and_the_model_is_restored(wide):
    ids = torch.tensor([wide.tokenizer(CORPUS[0]).input_ids])
    plain = _logits(wide, ids)
    err = {}
    for spec in ("gguf:Q8_0", "gguf:Q5_1", "quanto:int4", "gguf:Q4_0", "quanto:int2"):
        with kv_cache_quantized(wide, spec) as info:
            got = _logits(wide, ids)
        assert info["kv_cache"] == spec and info["kv_group_size"] == 32
        err[spec] = (got - plain).abs().amax(-1)[0]
        assert (err[spec][1:] > 0).all()  # the prompt's own positions too, as in llama.cpp
    assert torch.equal(_logits(wide, ids), plain)  # attention implementation restored
    assert wide.model.config._attn_implementation == "sdpa"
    mean = {k: float(v.mean()) for k, v in err.items()}
    assert mean["gguf:Q8_0"] < mean["gguf:Q5_1"] < mean["gguf:Q4_0"] < mean["quanto:int2"], mean
    assert mean["quanto:int4"] < mean["quanto:int2"]


def test_cached_prefix_passes_agree_with_whole_prompts_under_a_quantized_cache(wide):
    """The prompt cache holds unquantized states and every read quantizes them again: answer passes on
    a cached, left-padded prefix give the margins and ablation effects of whole right-padded prompts."""
    tok = wide.tokenizer
    prompts = [tok(t + " Emotion:").input_ids for t in CORPUS[:6]]
    tokens = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in ["joy", "fear", "anger"]]
    gold = np.array([0, 1, 2, 0, 1, 2])
    saes = {2: SAE.init(SAEConfig(d_in=32, d_sae=64, k=8, hook_name="blocks.2.hook_resid_post"), seed=1)}
    plain = ablate(wide, saes, answer_batches(wide, prompts, 4), gold, tokens, {})
    with kv_cache_quantized(wide, "gguf:Q4_0"):
        whole = [AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(wide, prompts, 4)]
        cached = answer_batches(wide, prompts, 4)
        for feats in ({}, {2: [0, 3, 5]}):
            np.testing.assert_allclose(ablate(wide, saes, cached, gold, tokens, feats),
                                       ablate(wide, saes, whole, gold, tokens, feats), atol=1e-5)
        assert np.abs(ablate(wide, saes, cached, gold, tokens, {}) - plain).max() > 1e-4


def test_schemes_and_errors(tiny_llama):
    assert set(KV_SCHEMES) == {"quanto:int4", "quanto:int2", "gguf:Q8_0", "gguf:Q4_0", "gguf:Q4_1", "gguf:Q5_0",
                               "gguf:Q5_1"}
    with pytest.raises(ValueError, match="unknown KV cache scheme"):
        check_kv_cache("int4")
    with pytest.raises(EmoscopeError, match="head_dim 8 is not a multiple of llama.cpp's block of 32"):
        with kv_cache_quantized(tiny_llama, "gguf:Q8_0"):
            pass
    with kv_cache_quantized(tiny_llama, "quanto:int4") as info:  # groups shrink to the head dimension
        assert info["kv_group_size"] == 8
    assert tiny_llama.model.config._attn_implementation == "sdpa"
