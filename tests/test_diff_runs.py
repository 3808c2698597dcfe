"""scripts/diff_runs.py: identical runs compare equal; a changed number or label is listed."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).parents[1] / "scripts" / "diff_runs.py"


def _run_dir(root: Path, effect: float, label: str) -> Path:
    (root / "trace").mkdir(parents=True)
    data = {"config_hash": str(root), "emotions": {"joy": {"effect": effect, "label": label, "n": 6}}}
    (root / "trace" / "result.json").write_text(json.dumps(data))
    pd.DataFrame({"feature": [1, 2], "effect": [effect, 0.5]}).to_parquet(root / "trace" / "features.parquet")
    return root


def _diff(a, b, tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--json", str(out)], capture_output=True,
                       text=True)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_identical_runs_and_listed_differences(tmp_path):
    a = _run_dir(tmp_path / "a", 0.25, "joy")
    r, rep = _diff(a, _run_dir(tmp_path / "b", 0.25, "joy"), tmp_path)
    assert r.returncode == 0 and rep["trace"]["identical"] == rep["trace"]["leaves"] == 4
    assert rep["trace"]["tables"]["features"]["max_abs"] == 0.0
    r, rep = _diff(a, _run_dir(tmp_path / "c", 0.25 + 1e-6, "anger"), tmp_path)
    t = rep["trace"]
    assert t["numeric_differ"] == 1 and abs(t["max_abs"] - 1e-6) < 1e-9 and t["max_at"] == ".emotions.joy.effect"
    assert t["beyond_tol"] == [[".emotions.joy.label", "joy", "anger"]]
    assert abs(t["tables"]["features"]["max_abs"] - 1e-6) < 1e-9


def test_nothing_to_compare_is_one_error_line(tmp_path):
    r, _ = _diff(tmp_path / "x", tmp_path / "y", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
