"""The blind spot (analysis/blindspot.py): builds a KLD or same-top-p bar passes that the emotion audit fails, the
reverse, and the rank correlation of KLD with flips; in the report, escaped."""

import pytest

from emoscope.analysis.blindspot import blind_spots


def _row(name, kld, top, flips, failed, precision=None, runtime=True):
    row = {"name": name, "changed": {"precision": precision} if precision else {}, "flip_rate": flips,
           "failed": failed, "kld": {"mean_kld": kld, "mean_kld_err": kld / 10, "same_top_p": top}}
    if runtime:
        row["runtime"] = "llama-cpp-python 0.3"
    return row


ROWS = [_row("q8", 0.002, 0.98, 0.02, False, "llama.cpp:Q8_0"), _row("q6", 0.006, 0.96, 0.25, True),
        _row("q4km", 0.03, 0.92, 0.10, False, "llama.cpp:Q4_K_M"), _row("q4_0", 0.05, 0.90, 0.15, False),
        _row("q2", 0.4, 0.71, 0.45, True), {"name": "paraphrase", "changed": {}, "flip_rate": 0.3, "failed": True,
                                             "kld": None}]


def test_builds_the_bar_passes_but_the_audit_fails_are_named():
    out = blind_spots(ROWS)
    assert out["n"] == 5 and out["bars"]["llama.cpp"] == {"mean_kld": 0.03, "same_top_p": 0.92}
    assert out["missed_by_kld"] == ["q6"]  # under Q4_K_M's KLD, yet 25% of its answers flip
    assert out["false_alarms_by_kld"] == ["q4_0"]  # over the bar, yet the audit passes it
    assert out["missed_by_same_top"] == ["q6"] and out["false_alarms_by_same_top"] == ["q4_0"]
    rho = out["spearman_kld_flips"]
    assert rho["value"] == pytest.approx(0.7) and rho["lo"] <= rho["value"] <= rho["hi"] and rho["n"] == 5
    # a bar the user sets
    strict = blind_spots(ROWS, kld_bar=0.001)
    assert strict["missed_by_kld"] == [] and set(strict["false_alarms_by_kld"]) == {"q8", "q4km", "q4_0"}


def test_a_q4km_build_identical_to_the_reference_is_no_bar():
    """A reference dequantised from a Q4_K_M file has its own format as a Q4_K_M row with KLD 0: as a bar it would call
    every other build unfit, so that runtime has no Q4_K_M bar."""
    twin = _row("q4km_twin", 0.0, 1.0, 0.0, False, "llama.cpp:Q4_K_M", runtime=False)
    twin["kld"]["mean_kld_err"] = 0.0
    out = blind_spots([twin, _row("int8", 0.001, 0.98, 0.01, False, "int8", runtime=False)])
    assert out["bars"]["transformers"]["mean_kld"] is None and out["false_alarms_by_kld"] == []


def test_a_q4km_file_made_from_the_reference_is_the_bar_before_the_shipped_one():
    """The shipped Q4_K_M file (model: source) a reference was dequantised from measures llama.cpp's arithmetic alone
    (Qwen2.5-1.5B: KLD 0.0020 against the re-quantized Q4_K_M's 0.0046): the file made from the reference's weights is
    the bar, whichever comes first; the shipped one only when there is no other."""
    shipped = _row("shipped", 0.002, 0.97, 0.01, False)
    shipped["file_type"] = "Q4_K_M"
    made = _row("q4km", 0.0046, 0.95, 0.03, False, "llama.cpp:Q4_K_M")
    q6 = _row("q6", 0.0035, 0.96, 0.04, False, "llama.cpp:Q6_K")
    assert blind_spots([shipped, q6, made])["bars"]["llama.cpp"]["mean_kld"] == 0.0046
    assert blind_spots([shipped, q6])["bars"]["llama.cpp"]["mean_kld"] == 0.002


def test_no_figures_no_table_and_too_few_builds_no_correlation():
    assert blind_spots([{"name": "x", "changed": {}, "flip_rate": 0.1, "failed": False}]) is None
    two = blind_spots(ROWS[:2])
    assert two["spearman_kld_flips"] is None and two["bars"]["llama.cpp"]["mean_kld"] is None
    assert two["missed_by_kld"] == []  # no bar: no verdict by it


def test_the_report_shows_the_blind_spot_escaped(tmp_path):
    import json

    from emoscope.report.html import _kld_figure

    rows = [dict(r) for r in ROWS[:5]]
    rows[1]["name"] = "<script>q6</script>"
    spots = blind_spots(rows)
    fig = _kld_figure(spots, {"config": {"thresholds": {"max_flip_rate": 0.2}}})
    assert json.loads(fig.to_json())["layout"]["xaxis"]["type"] == "log"
    from jinja2 import Environment, PackageLoader, select_autoescape
    env = Environment(loader=PackageLoader("emoscope", "report/templates"), autoescape=select_autoescape(["html"]))
    tpl = env.get_template("report.html")
    src = tpl.environment.loader.get_source(tpl.environment, "report.html")[0]
    start = src.index("{% if blind %}")
    page = env.from_string(src[start:src.index("{% endif %}</section>", start) + len("{% endif %}")]).render(
        blind=spots, audit_kld="")
    assert "&lt;script&gt;q6&lt;/script&gt;" in page and "<script>q6" not in page
    assert "What the standard figure misses" in page and "Spearman" in page
