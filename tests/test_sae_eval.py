"""SAE evaluation: CE-loss recovered on a tiny model against values checked by construction."""

import pytest
import torch
import torch.nn.functional as F

from emoscope.sae import SAE, SAEConfig
from emoscope.hooks import pad_batch
from emoscope.sae.quality import evaluate_saes, lm_loss


def _identity_sae(d):
    """relu(x) - relu(-x) = x: a ReLU SAE that reconstructs perfectly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name="blocks.1.hook_resid_post"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def _zero_sae(d):
    return SAE(SAEConfig(d_in=d, d_sae=4, architecture="relu", hook_name="blocks.1.hook_resid_post"))


def test_lm_loss_matches_full_logits(tiny_llama):
    tok = tiny_llama.tokenizer
    seqs = [tok("I am so happy today, this is wonderful news!").input_ids, tok("That was gross.").input_ids]
    ids, mask = pad_batch(seqs, "cpu")
    total, n = lm_loss(tiny_llama, ids, mask, chunk=5)
    logits = tiny_llama.model(input_ids=ids, attention_mask=mask).logits
    ref = [F.cross_entropy(logits[i, 1:len(s) - 1], ids[i, 2:len(s)], reduction="sum") for i, s in enumerate(seqs)]
    assert int(n) == sum(len(s) - 2 for s in seqs)
    torch.testing.assert_close(float(total), float(sum(ref)), atol=1e-3, rtol=1e-5)


def test_ce_recovered_identity_is_one_and_zero_sae_is_zero(tiny_llama):
    tok = tiny_llama.tokenizer
    batches = [pad_batch([tok(t).input_ids for t in ["I am so happy today!",
                                                     "Why would you do that? I am furious."]], "cpu")]
    q = evaluate_saes(tiny_llama, {"blocks.1.hook_resid_post": _identity_sae(32)}, batches)["blocks.1.hook_resid_post"]
    assert abs(q["ce_recovered"] - 1) < 1e-4 and q["fvu"] < 1e-8 and abs(q["cosine"] - 1) < 1e-5
    assert abs(q["delta_lm_loss"]) < 1e-4 and q["ce_zero"] > q["ce_clean"]
    z = evaluate_saes(tiny_llama, {"blocks.1.hook_resid_post": _zero_sae(32)}, batches)["blocks.1.hook_resid_post"]
    # a zero SAE reconstructs b_dec = 0: exactly the zero ablation
    assert abs(z["ce_recovered"]) < 1e-6 and z["dead_frac"] == 1.0 and z["l0"] == 0
    assert abs(z["fvu"] - 1 - _mean_sq_over_var(tiny_llama, batches)) < 1e-4


def _mean_sq_over_var(view, batches):
    """FVU of the all-zero reconstruction is sum||x||^2 / sum||x - mean||^2 = 1 + n||mean||^2 / total var."""
    from emoscope.hooks import HookPoint, record
    ids, mask = batches[0]
    keep = mask.bool().clone()
    keep[:, 0] = False
    with torch.no_grad(), record(view, [HookPoint(1)]) as acts:
        view.model(input_ids=ids, attention_mask=mask)
    x = acts["blocks.1.hook_resid_post"][keep].double()
    return float(len(x) * x.mean(0).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_replaying_the_blocks_before_the_hook_changes_no_number(arch):
    """A spliced pass that replays the clean pass's blocks before its hook gives the same losses, bit for bit,
    as one that recomputes them: for a residual hook (the block itself replayed) and sublayer hooks."""
    from tiny import tiny_model

    from emoscope.sae import SAE, SAEConfig
    view = tiny_model(arch)
    tok = view.tokenizer
    batches = [pad_batch([tok(t).input_ids for t in ["I am so happy today!", "Why would you do that? I am furious.",
                                                     "That was gross."]], "cpu")] * 2
    saes = {}
    for name in ("blocks.2.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"):
        torch.manual_seed(len(saes))
        saes[name] = SAE.init(SAEConfig(d_in=32, d_sae=64, k=4, hook_name=name), seed=len(saes))
    from emoscope.hooks import HookPoint, hook_module
    calls = []
    hook_module(view, HookPoint(0, "attn_out")).register_forward_hook(lambda *_: calls.append(1))
    a = evaluate_saes(view, saes, batches, reuse=False)
    n_recomputed, calls[:] = len(calls), []
    b = evaluate_saes(view, saes, batches)
    # block 0 runs in each batch's clean pass and in the attn_out SAE's own passes, not in the other SAEs'
    assert (n_recomputed, len(calls)) == (2 + 3 * 2 * 2, 2 + 2 * 2)
    assert a == b and all(0 < q["ce_zero"] and q["ce_sae"] != q["ce_clean"] for q in b.values())
    assert all("forward" not in blk.__dict__ for blk in view.blocks)  # every block restored


def test_ce_on_sampled_positions(tiny_llama):
    """With ce_positions, the losses are taken at the same seeded positions in every pass: an identity SAE still
    recovers exactly 1, the clean loss is the mean CE at those positions, and another seed samples others."""
    from emoscope.sae.quality import ce_sample
    tok = tiny_llama.tokenizer
    seqs = [tok(t).input_ids for t in ["I am so happy today, this is wonderful news!", "That was gross, I feel sick."]]
    ids, mask = pad_batch(seqs, "cpu")
    pos = ce_sample(mask, 7, seed=3)
    assert len(pos) == 7 and torch.equal(pos, ce_sample(mask, 7, seed=3))
    assert not torch.equal(pos, ce_sample(mask, 7, seed=4))
    assert ce_sample(mask, 10_000, seed=3) is None  # more than there are: every position
    q = evaluate_saes(tiny_llama, {"blocks.1.hook_resid_post": _identity_sae(32)}, [(ids, mask)], ce_positions=7,
                      seed=0)["blocks.1.hook_resid_post"]
    assert abs(q["ce_recovered"] - 1) < 1e-4
    logits = tiny_llama.model(input_ids=ids, attention_mask=mask).logits[:, 1:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    want = ce_sample(mask, 7, seed=0)
    ref = F.cross_entropy(logits[want], ids[:, 2:].reshape(-1)[want])
    torch.testing.assert_close(q["ce_clean"], float(ref), atol=1e-4, rtol=1e-5)
