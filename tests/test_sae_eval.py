"""SAE evaluation: CE-loss recovered on a tiny model against values checked by construction."""

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
