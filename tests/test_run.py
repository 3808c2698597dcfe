"""`emoscope run`: stages into a run directory, skip when up to date, escaped HTML report."""

import json

import yaml

from emoscope.run import RunConfig, run


def _cfg(tmp_path, tiny_dir, data):
    return RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "evaluate": {"model": {"name": str(tiny_dir), "dtype": "float32"},
                     "data": {"dataset": str(data), "per_class": 3}, "shots": 1},
    })


def test_run_skips_up_to_date_stage_and_escapes_report(tmp_path, tiny_dir, toy_data):
    data = tmp_path / "planted.csv"
    # every text carries markup: it must reach the report as text, never as markup
    rows = toy_data.read_text().splitlines()
    rows = rows[:1] + [r.replace("I feel", "<script>window.__pwned=1</script> <b>I</b> feel") for r in rows[1:]]
    data.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, tiny_dir, data)
    logs = []
    report = run(cfg, log=logs.append)
    result = tmp_path / "run" / "evaluate" / "result.json"
    first = result.read_bytes()
    html = report.read_text()
    assert "<script>window.__pwned" not in html and "<b>I</b>" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt; &lt;b&gt;I&lt;/b&gt; feel" in html
    assert "Task accuracy" in html and "plotly" in html.lower()
    logs.clear()
    run(cfg, log=logs.append)
    assert any("up to date" in l for l in logs) and result.read_bytes() == first
    logs.clear()
    run(cfg, force={"evaluate"}, log=logs.append)
    assert not any("up to date" in l for l in logs) and result.read_bytes() == first  # deterministic


def test_changed_key_reruns(tmp_path, tiny_dir, toy_data):
    cfg = _cfg(tmp_path, tiny_dir, toy_data)
    run(cfg, log=lambda s: None)
    h1 = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["config_hash"]
    cfg.evaluate.seed = 1
    logs = []
    run(cfg, log=logs.append)
    h2 = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["config_hash"]
    assert h1 != h2 and not any("up to date" in l for l in logs)


def test_quick_config_is_valid():
    from pathlib import Path
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quick.yaml").read_text())
    cfg = RunConfig.model_validate(raw)
    assert cfg.evaluate.model.name == "gemma3-270m" and cfg.run_dir == "runs/demo"
