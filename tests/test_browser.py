"""The report in a real browser (Debian's chromium, headless, driven by Playwright): every section
and plot renders, no script error, a feature card opens from a link, and a planted <script> row
from the dataset is shown as text and never executed. A screenshot is saved in the test's tmp dir."""

import json
import shutil

import pytest

from emoscope.config import RunConfig
from emoscope.pipeline import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not __import__("os").environ.get("CI"), reason="chromium not installed")
def test_report_in_headless_chromium(tmp_path, tiny_dir, toy_data, shared_data):
    sync_api = pytest.importorskip("playwright.sync_api")
    assert CHROMIUM, "CI must install Debian's chromium (see .ci/run)"
    rows = toy_data.read_text().splitlines()
    planted = tmp_path / "planted.csv"
    planted.write_text("\n".join(rows[:1] + [r.replace("I feel", "<script>window.__pwned=1</script> I feel")
                                             for r in rows[1:]]) + "\n")
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)},
        "stages": ["evaluate", "saes", "phases", "trace", "steer", "audit"],
        "evaluate": {"data": {"dataset": str(planted), "per_class": 6}},
        "saes": {"train": {"tokens": 3000, "layers": [1, 2, 3], "expansion": 2, "k": 4, "batch_tokens": 256,
                           "buffer_tokens": 1024, "seqs_per_forward": 4}, "eval_seqs": 4},
        "phases": {"min_per_class": 3, "n_boot": 10, "probe_folds": 2, "min_auroc": 0.5, "fdr": 0.5},
        "trace": {"examples": "all", "per_emotion": 3, "candidates": 2, "n_random": 3, "n_boot": 50},
        "steer": {"dev_per_class": 3, "features_per_emotion": [1], "strengths": [2.0], "transfer": [],
                  "ppl_seqs": 2, "n_boot": 100},
        "audit": {"candidates": [{"name": "typos", "text": "typos"}, {"name": "int4", "precision": "int4"}],
                  "n_boot": 100},
    })
    report = run(cfg, log=lambda s: None)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        for sec in ["task", "saes", "phases", "trace", "steer", "audit", "provenance"]:
            assert page.locator(f"section#{sec}").is_visible(), sec
        # every plotly figure drew its SVG
        n_plots = page.locator("div.plotly-graph-div").count()
        assert n_plots >= 5 and page.locator("div.plotly-graph-div .main-svg").count() >= n_plots
        # the planted markup is text on the page and never ran
        assert page.evaluate("window.__pwned === undefined")
        assert "<script>window.__pwned=1</script>" in page.locator("section#task").inner_text()
        links = page.locator("a.feature-link")
        assert links.count() > 0
        href = links.first.get_attribute("href")
        assert not page.locator(href).evaluate("el => el.open")
        links.first.click()
        assert page.locator(href).evaluate("el => el.open")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "report.png").stat().st_size > 10_000
    json.loads((tmp_path / "run" / "phases" / "result.json").read_text())
    # the markdown summaries (`emoscope summarize RUN --stage S`) read every stage's result
    from emoscope.report.tables import TABLES
    md = {stage: fn(tmp_path / "run") for stage, fn in TABLES.items()}
    assert "share of emotion-selective features" in md["phases"] and "| anger |" in md["phases"]
    assert "random control" in md["trace"] and "| feature_steering |" in md["steer"] and "| int4 |" in md["audit"]
    from emoscope.report.console import headlines
    lines = headlines(tmp_path / "run")  # printed at the end of `emoscope run`
    assert [line.split(":")[0].split(",")[0] for line in lines] == ["tracing", "steering", "audit"]
