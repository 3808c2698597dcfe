"""Feature cards (`sae.cards`) against direct computation on a tiny model, and their Neuronpedia layout."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from emoscope.data import Example
from emoscope.hooks import HookPoint, record
from emoscope.sae import SAE, SAEConfig
from emoscope.sae.cards import card_key, feature_cards, neuronpedia_batch
from emoscope.task import Task
from tiny import CORPUS

LABELS = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
# the fields SAEDashboard's NeuronpediaDashboardFeature.to_dict writes (sae_dashboard/neuronpedia)
NP_FEATURE = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
              "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
              "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
              "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
              "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
              "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}
NP_ACTIVATION = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


@pytest.fixture(scope="module")
def setup(tiny_llama):
    task = Task(tiny_llama, labels=LABELS)
    examples = [Example(f"e{i}", CORPUS[i % 6] + f" ({i})", (LABELS[i % 6],)) for i in range(18)]
    hook = "blocks.2.hook_resid_post"
    sae = SAE.init(SAEConfig(d_in=32, d_sae=64, k=6, hook_name=hook), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return task, examples, {hook: sae}, hook


def _direct(task, sae, hook, text):
    """The feature code at each text token and at the final token, from one unpadded forward."""
    ids, pos = task.positions(text, "text")
    hp = HookPoint.parse(hook)
    with torch.no_grad(), record(task.model, [hp]) as acts:
        task.model.model(input_ids=torch.tensor([ids]))
        codes = sae.encode(acts[hook][0].float())
    return ids, pos, codes[pos], codes[-1]


def test_cards_match_direct_computation(setup):
    task, examples, saes, hook = setup
    sae = saes[hook]
    direct = [_direct(task, sae, hook, e.text) for e in examples]
    last = torch.stack([d[3] for d in direct])
    feats = [int(f) for f in torch.argsort(-(last > 0).float().sum(0))[:3]]  # features active on several
    cards = feature_cards(task, saes, [(hook, f) for f in feats], examples, LABELS)
    assert set(cards) == {card_key(hook, f) for f in feats}
    y = np.array([LABELS.index(e.label) for e in examples])
    for f in feats:
        c = cards[card_key(hook, f)]
        text_acts = [d[2][:, f].numpy() for d in direct]
        allv = np.concatenate(text_acts)
        assert c["n_tokens"] == len(allv) and c["frac_nonzero"] == pytest.approx((allv > 0).mean())
        assert sum(c["act_hist"]["heights"]) == int((allv > 0).sum())
        for ex in c["top_examples"] + c["answer_examples"]:  # every token of a shown example, in order
            i = int(ex["id"][1:])
            ids, pos = direct[i][0], direct[i][1]
            assert ex["tokens"] == [task.model.tokenizer.decode([ids[p]]) for p in pos]
            np.testing.assert_allclose(ex["values"], text_acts[i], atol=1e-3)
            assert ex["answer"] == pytest.approx(float(last[i, f]), abs=1e-4)
        best = np.array([t.max() for t in text_acts])
        shown = [int(e["id"][1:]) for e in c["top_examples"]]
        assert len(shown) == min(5, int((best > 0).sum()))  # the strongest examples, no inactive one
        assert min(best[shown]) >= np.delete(best, shown).max(initial=0) - 1e-4
        for e, lab in enumerate(LABELS):
            assert c["selectivity"][lab]["auroc"] == pytest.approx(roc_auc_score(y == e, last[:, f].numpy()), abs=1e-6)
        w = task.model.unembed.weight.detach().float() @ sae.W_dec[f].detach().float()
        assert [t for t, _ in c["promoted"]] == [task.model.tokenizer.decode([int(t)]) for t in w.topk(10).indices]
        assert c["suppressed"][0][1] == pytest.approx(float(w.min()), abs=1e-5)


def test_neuronpedia_batch_layout(setup):
    task, examples, saes, hook = setup
    cards = feature_cards(task, saes, [(hook, 5), (hook, 1)], examples, LABELS)
    batch = neuronpedia_batch(list(cards.values()), "tiny", 2, "emoscope-test", "toy")
    assert set(batch) == {"model_id", "layer", "sae_set", "features"} and batch["layer"] == 2
    assert [f["feature_index"] for f in batch["features"]] == [1, 5]
    for f in batch["features"]:
        assert set(f) == NP_FEATURE
        assert all(set(a) == NP_ACTIVATION and len(a["tokens"]) == len(a["values"]) for a in f["activations"])
        assert f["neg_values"] == sorted(f["neg_values"]) and f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert max(f["neg_values"]) <= min(f["pos_values"]) and f["n_prompts_total"] == len(examples)
