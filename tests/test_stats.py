"""Analysis statistics against scipy / scikit-learn and hand-made cases."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from emoscope.analysis.stats import auroc, bh_fdr, eta_squared, linear_cka, mannwhitney_p, probe_accuracy


def test_auroc_and_mannwhitney_match_references():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(80, 6)), 1)  # rounding makes ties
    x[:, 5] = 0.0  # a constant column
    pos = rng.random(80) < 0.3
    auc = auroc(x, pos)
    p = mannwhitney_p(x, pos)
    for j in range(5):
        assert auc[j] == pytest.approx(roc_auc_score(pos, x[:, j]))
        ref = mannwhitneyu(x[pos, j], x[~pos, j], alternative="two-sided", method="asymptotic",
                           use_continuity=True).pvalue
        assert p[j] == pytest.approx(ref, rel=1e-6)
    assert auc[5] == 0.5 and p[5] == 1.0


def test_bh_fdr():
    from scipy.stats import false_discovery_control
    p = np.random.default_rng(1).random((7, 5)) ** 3
    np.testing.assert_allclose(bh_fdr(p), false_discovery_control(p.ravel()).reshape(7, 5))


def test_eta_squared_and_cka():
    g = np.repeat(np.arange(10), 20)
    x = np.stack([g.astype(float), np.random.default_rng(2).normal(size=200)], 1)
    eta = eta_squared(x, g)
    assert eta[0] == pytest.approx(1.0) and abs(eta[1]) < 0.1
    a = np.random.default_rng(3).normal(size=(50, 8))
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(8, 8)))
    assert linear_cka(a, 3 * a @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(a, np.random.default_rng(5).normal(size=(50, 8))) < 0.5


def test_probe_and_shuffled_control():
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 10))
    x[:, 0] += 6 * y
    assert probe_accuracy(x, y) > 0.9
    assert probe_accuracy(x, y, shuffle_labels=True) < 0.6


def test_macro_f1_helper_matches_classification_metrics():
    """The data-efficiency curve's macro-F1 (and its per-resample values) is the task metric's definition."""
    from emoscope.task.metrics import classification_metrics, macro_f1
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 5, 80), rng.integers(0, 5, 80)
    p[:10] = y[:10]
    ref = classification_metrics(y, p, list("abcde"), n_boot=500, seed=7)
    assert macro_f1(y, p, 5) == pytest.approx(ref["macro_f1"]["value"], abs=1e-12)
    idx = np.random.default_rng(7).integers(0, 80, size=(500, 80))  # the resamples classification_metrics draws
    boots = macro_f1(y, p, 5, idx)
    assert np.percentile(boots, 2.5) == pytest.approx(ref["macro_f1"]["lo"], abs=1e-12)
    assert np.percentile(boots, 97.5) == pytest.approx(ref["macro_f1"]["hi"], abs=1e-12)
