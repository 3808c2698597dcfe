"""Hooks return exactly the hidden states that output_hidden_states returns."""

import pytest
import torch

from emoscope.hooks import HookPoint, all_resid, record
from emoscope.errors import EmoscopeError
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_resid_hooks_equal_hidden_states(arch):
    v = tiny_model(arch)
    ids = torch.tensor([v.tokenizer("I am so happy today, wonderful").input_ids])
    with record(v, all_resid(v) + [HookPoint(1, "attn_out"), HookPoint(1, "mlp_out")]) as acts:
        out = v.model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, then each block; the last one is after the final norm
    for layer in range(v.n_layers - 1):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hs[layer + 1])
    last = acts[f"blocks.{v.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(v.final_norm(last), hs[-1])
    # resid_post(L) = resid_post(L-1) + attn_out(L) + mlp_out(L)
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"],
                               hs[1] + acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"],
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(EmoscopeError, match="unknown hook"):
        HookPoint.parse("blocks.1.resid")
    assert HookPoint.parse("blocks.3.hook_mlp_out") == HookPoint(3, "mlp_out")



@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_a_stopped_forward_records_the_same_and_runs_nothing_after_the_deepest_hook(arch):
    v = tiny_model(arch)
    ids = torch.tensor([v.tokenizer("I am so happy today, wonderful").input_ids] * 2)
    hooks = [HookPoint(0), HookPoint(1, "mlp_out"), HookPoint(1, "attn_out")]
    with record(v, hooks) as full:
        v.model(input_ids=ids)
    ran = []
    later = [v.blocks[2], v.blocks[3], v.final_norm, v.model.get_output_embeddings()]
    counters = [m.register_forward_hook(lambda mod, i, o, n=n: ran.append(n)) for n, m in enumerate(later)]
    after = []
    try:
        with record(v, hooks, stop=True) as acts:
            v.model(input_ids=ids)
            after.append("body went on")
    finally:
        for c in counters:
            c.remove()
    assert ran == [] and after == [] and set(acts) == set(full)
    for name in full:
        torch.testing.assert_close(acts[name], full[name], rtol=0, atol=0)
    with record(v, hooks, stop=True) as acts:  # the hooks are gone after the block: a plain forward again
        pass
    assert v.model(input_ids=ids).logits.shape[:2] == ids.shape
