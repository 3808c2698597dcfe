"""The per-emotion difficulty table (`analysis.difficulty`) on planted evaluate/phases/trace results."""

import pytest

from emoscope.analysis.difficulty import associations, difficulty

LABS = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


def est(v, lo, hi, n=10):
    return {"value": v, "lo": lo, "hi": hi, "n": n}


def planted(effective_n, recalls=(0.8, 0.3, 0.9, 0.9, 0.7, 0.6)):
    conf = []
    for i, r in enumerate(recalls):  # 10 examples per emotion; the rest go to the next label, one to the one after
        row = [0] * 6
        row[i] = round(10 * r)
        rest = 10 - row[i]
        row[(i + 1) % 6 if i != 1 else 0] += rest - (rest > 1)  # disgust's errors go mostly to anger
        row[(i + 2) % 6] += rest > 1
        conf.append(row)
    ev = {"labels": LABS, "calibrated": {"confusion": conf, "per_class": {
        lab: {"recall": est(r, r - 0.2, r + 0.1)} for lab, r in zip(LABS, recalls)}}}
    emotions = {lab: {"strongest_phase": 2, "phases": {"2": {
        "features": [{"effect": est(2.0 / n, 1.5 / n, 2.5 / n)}], "n_for_80": int(n), "effective_n": n,
        "random_control": {"mean": 0.0, "lo": -0.1, "hi": 0.1, "n": 8}}}} for lab, n in zip(LABS, effective_n)}
    tr = {"emotions": emotions, "cross_effects_ci": {"anger": {"disgust": est(0.4, 0.1, 0.7)}}}
    ph = {"specific_counts": dict.fromkeys(LABS, 2), "shared_counts": dict.fromkeys(LABS, 1)}
    return ev, ph, tr


def test_rows_read_the_planted_numbers():
    ev, ph, tr = planted([2.0, 6.0, 1.0, 1.5, 3.0, 1.2])
    d = difficulty(ev, ph, tr)["emotions"]
    assert list(d) == LABS
    dis = d["disgust"]
    assert dis["recall"]["value"] == 0.3 and dis["support"] == 10
    assert dis["partners"][0] == {"label": "anger", "n": 6, "share": pytest.approx(0.6)}
    assert dis["partners"][1]["label"] == "joy" and dis["partner_share"] == pytest.approx(0.6)
    assert dis["partner_cross_effect"] == est(0.4, 0.1, 0.7)  # ablating anger's set helps disgust
    assert dis["effective_n"] == 6.0 and dis["n_for_80"] == 6 and dis["strongest_phase"] == 2
    assert dis["top_effect"]["value"] == pytest.approx(1 / 3) and dis["beats_random"] is True
    assert dis["selective"] == 3 and dis["specific"] == 2
    assert d["fear"]["partner_cross_effect"] is None  # fear's partner (joy) has no causal set here
    assert d["fear"]["partners"][0]["label"] == "joy" and d["joy"]["partners"] == [
        {"label": "sadness", "n": 1, "share": pytest.approx(0.1)}]  # one error: one partner


def test_untraced_emotion_and_old_results():
    ev, ph, tr = planted([2.0, 6.0, 1.0, 1.5, 3.0, 1.2])
    del tr["emotions"]["surprise"]
    tr["cross_effects"] = {"anger": {"disgust": 0.4}}
    del tr["cross_effects_ci"]  # a trace result from before the intervals: the mean alone
    d = difficulty(ev, None, tr)["emotions"]
    assert d["surprise"]["traced"] is False and d["surprise"]["effective_n"] is None
    assert d["disgust"]["partner_cross_effect"] == {"value": 0.4, "lo": None, "hi": None, "n": None}
    assert "selective" not in d["disgust"]


def test_associations_are_exact_permutation_tests():
    # recall falls exactly as the causal features get more diffuse: rho = -1, p = 2/720 (two-sided, exact)
    ev, ph, tr = planted([2.0, 6.0, 1.0, 1.5, 3.0, 4.0], recalls=(0.8, 0.3, 0.95, 0.9, 0.7, 0.6))
    a = difficulty(ev, ph, tr)["associations"]
    assert a["effective_n"]["rho"] == pytest.approx(-1.0) and a["effective_n"]["n"] == 6
    assert a["effective_n"]["p"] == pytest.approx(2 / 720)
    assert a["top_effect"]["rho"] == pytest.approx(1.0)  # top effect = 2 / effective n here
    assert a["selective"] is None  # every emotion has 3: nothing to correlate
    assert a["partner_cross_effect"] is None and "partner_share" not in a  # one emotion has it; the share is
    # bounded by 1 - recall, so it is not offered as an explanation
    rows = {lab: {"recall": est(r, 0, 1), "effective_n": n} for lab, r, n in zip(LABS, (0.1, 0.5, 0.2, 0.9, 0.3, 0.6),
                                                                               (3.0, 1.0, 6.0, 2.0, 4.0, 5.0))}
    weak = associations(rows)["effective_n"]
    assert abs(weak["rho"]) < 0.5 and weak["p"] > 0.2  # a scrambled order is not significant
