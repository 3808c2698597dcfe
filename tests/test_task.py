"""Scoring against a naive reference, calibration arithmetic, metrics against scikit-learn, prompts."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from emoscope.task import calibrate
from emoscope.data import EKMAN, Example
from emoscope.errors import EmoscopeError
from emoscope.task.metrics import classification_metrics
from emoscope.task.prompts import PromptBuilder, Template
from emoscope.task.score import score_ids, score_naive
from tiny import CORPUS, tiny_model


def _prompts(view, chat=False, shots=2):
    demos = [Example("d1", "So happy!", ("joy",)), Example("d2", "Scary stuff.", ("fear",))][:shots]
    b = PromptBuilder(view.tokenizer, Template(), EKMAN, demos, chat, view.max_context)
    return [b.encode(b.prompt(t)) for t in CORPUS[:5]], b.label_ids()


@pytest.mark.parametrize("arch,window", [("llama", 0), ("qwen2", 0), ("gpt2", 0), ("gemma3", 512), ("gemma3", 24)])
def test_shared_prefix_scoring_equals_naive(arch, window):
    view = tiny_model(arch, sliding_window=window or 16)
    prompts, labels = _prompts(view)
    assert max(map(len, labels)) > 1  # multi-token labels are exercised
    if window == 24:
        assert max(map(len, prompts)) > 24  # prompts run past the sliding window
    fast = score_ids(view, prompts, labels, batch_size=3)
    ref = score_naive(view, prompts, labels)
    np.testing.assert_allclose(fast, ref, atol=1e-4)


def test_chat_prompts_score_equal_naive(tiny_llama):
    prompts, labels = _prompts(tiny_llama, chat=True)
    assert all(p[:5] == prompts[0][:5] for p in prompts)
    np.testing.assert_allclose(score_ids(tiny_llama, prompts, labels, 2), score_naive(tiny_llama, prompts, labels),
                               atol=1e-4)


def test_prompt_builder_plain_and_chat(tiny_llama):
    tok = tiny_llama.tokenizer
    demos = [Example("d1", "So {happy}!", ("joy",))]
    plain = PromptBuilder(tok, Template(), ["joy", "fear"], demos, False, 256)
    p = plain.prompt("It's {text} odd")
    assert p.endswith("Text: It's {text} odd\nEmotion:") and "Text: So {happy}!\nEmotion: joy\n\n" in p
    assert plain.label_strings() == [" joy", " fear"]
    chat = PromptBuilder(tok, Template(system="Be brief."), ["joy", "fear"], demos, True, 256)
    c = chat.prompt("hello")
    assert c.startswith("<|im_start|>system\nBe brief.") and c.endswith("<|im_start|>assistant\n")
    assert chat.label_strings() == ["joy", "fear"]
    order = PromptBuilder(tok, Template(label_order=["fear", "joy"]), ["joy", "fear"], [], False, 256)
    assert "from: fear, joy." in order.prompt("x")
    with pytest.raises(EmoscopeError, match="permutation"):
        PromptBuilder(tok, Template(label_order=["fear"]), ["joy", "fear"], [], False, 256)
    with pytest.raises(ValueError, match="placeholder"):
        Template(example="no placeholder here")


def test_long_text_truncated_from_left(tiny_llama):
    b = PromptBuilder(tiny_llama.tokenizer, Template(), EKMAN, [], False, max_context=160)
    long = "first words " + "blah " * 200 + "THE END"
    with pytest.warns(UserWarning, match="truncated from the left"):
        p = b.prompt(long)
    assert b.n_truncated == 1 and "THE END" in p and "first words" not in p
    assert len(b.encode(p)) + max(map(len, b.label_ids())) <= 160


def test_calibration_arithmetic():
    logp = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]))
    prior = calibrate.prior_from_scores(logp)
    np.testing.assert_allclose(np.exp(prior), [0.55, 0.35, 0.1])
    cal = np.exp(calibrate.apply_prior(logp, prior))
    expect = np.array([[0.6 / 0.55, 0.3 / 0.35, 1.0], [0.5 / 0.55, 0.4 / 0.35, 1.0]])
    np.testing.assert_allclose(cal, expect / expect.sum(1, keepdims=True))
    # unnormalised inputs give the same answer: only label-relative scores matter
    np.testing.assert_allclose(calibrate.apply_prior(logp - 3.0, prior), np.log(cal))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=5, max_size=60))
def test_metrics_match_sklearn(pairs):
    y, p = np.array(pairs).T
    labels = ["a", "b", "c", "d"]
    m = classification_metrics(y, p, labels, n_boot=100, seed=0)
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"]["value"] == pytest.approx(f1_score(y, p, labels=range(4), average="macro", zero_division=0))
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab]["precision"]["value"] == pytest.approx(pr[i])
        assert m["per_class"][lab]["recall"]["value"] == pytest.approx(rc[i])
        assert m["per_class"][lab]["f1"]["value"] == pytest.approx(f1[i])
        assert m["per_class"][lab]["support"] == sup[i]
    assert m["confusion"] == confusion_matrix(y, p, labels=range(4)).tolist()
    assert m["accuracy"]["lo"] <= m["accuracy"]["value"] <= m["accuracy"]["hi"]


def test_bootstrap_interval_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 50)
    big = rng.integers(0, 2, 2000)
    ms = classification_metrics(small, np.zeros(50, int), ["a", "b"], 500)
    mb = classification_metrics(big, np.zeros(2000, int), ["a", "b"], 500)
    width = lambda m: m["accuracy"]["hi"] - m["accuracy"]["lo"]
    assert width(mb) < width(ms) / 3
