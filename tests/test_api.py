"""The public API: the README's notebook example runs (on a tiny model, sizes shrunk), results round-trip
through save/load, `help(emoscope)` shows the API, and users' own data is used as given."""

import csv
import json
import pydoc
import re
from pathlib import Path

import pytest

import emoscope as es

README = Path(__file__).parents[1] / "README.md"

# Each README line stays as written except for these sizes (a tiny random model and a toy dataset).
SHRINK = {
    'es.load_model("gemma3-270m")': "es.load_model(TINY)",
    'dataset="isear", shots=6, per_class=20': "dataset=TOY, per_class=4",
    "es.train_saes(model, layers=[4, 8, 12, 16])": "es.train_saes(model, layers=[1, 3], tokens=4000, expansion=4, "
                                                   "k=4, batch_tokens=256, buffer_tokens=1024, seqs_per_forward=4, "
                                                   "eval_seqs=8)",
    "es.phases(task, saes, ev)": 'es.phases(task, saes, ev, {"min_per_class": 3, "n_boot": 10, "probe_folds": 2})',
    "es.trace(task, saes, ev, ph)": 'es.trace(task, saes, ev, ph, {"examples": "all", "per_emotion": 3, '
                                    '"candidates": 2, "n_random": 3, "n_boot": 50})',
    "es.steer(task, saes, ev, tr)": 'es.steer(task, saes, ev, tr, {"dev_per_class": 3, "features_per_emotion": [1], '
                                    '"strengths": [2.0], "transfer": ["isear"], "transfer_per_class": 2, '
                                    '"ppl_seqs": 2, "n_boot": 100})',
    '"precision": "int4"}]}': '"precision": "int4"}], "n_boot": 100, "ablation_per_emotion": 2}',
    # the served build: here the tiny model itself (a llama.cpp build is tested in test_llamacpp.py)
    'es.load_model("model.Q4_K_M.gguf", backend="llama.cpp")': "model",
}


def _notebook_example() -> str:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    for old, new in SHRINK.items():
        assert old in code, f"the README example no longer contains {old!r}: update SHRINK"
        code = code.replace(old, new)
    return code


def test_readme_notebook_example_runs(tiny_dir, toy_data, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"TINY": str(tiny_dir), "TOY": str(toy_data)}
    exec(compile(_notebook_example(), "README.md", "exec"), ns)
    ev, ph, tr, st, au = (ns[k] for k in ("ev", "ph", "tr", "st", "au"))
    assert isinstance(ev.accuracy, es.Estimate) and ev.accuracy.lo <= ev.accuracy.value <= ev.accuracy.hi
    assert ev.n == 24 and len(ev.to_frame()) == 24 and list(ev.metrics().label) == ev.labels
    assert list(ph.to_frame().layer) == [1, 3] and 1 <= ph.n_phases <= 2
    assert set(tr.to_frame().emotion) <= set(ev.labels) and tr.causal_sets
    assert isinstance(st.steering, es.Steering) and "feature_steering" in set(st.to_frame().method)
    assert list(au.to_frame().candidate) == ["int4"]
    loaded = es.EvalResult.load(tmp_path / "my_run" / "evaluate")
    assert loaded.data == ev.data and loaded.predictions.equals(ev.predictions)
    for res, cls in ((ph, es.PhasesResult), (tr, es.TraceResult), (st, es.SteerResult), (au, es.AuditResult)):
        back = cls.load(res.save(tmp_path / res.stage))
        assert json.dumps(back.data, default=str) == json.dumps(res.data, default=str)  # NaN-safe equality
    assert (tmp_path / "phases" / "store_last" / "manifest.json").is_file()
    assert es.SteerResult.load(tmp_path / "steer").steering == st.steering
    assert es.canary.check(ns["served"], tmp_path / "canary").passed  # the reference passes its own canary


def test_help_shows_the_api():
    text = pydoc.render_doc(es, renderer=pydoc.plaintext)
    for name in ("load_model", "Task", "evaluate", "train_saes", "load_saes", "phases", "trace", "steer", "audit",
                 "run"):
        assert name in es.__all__ and re.search(rf"\b{name}\b", text), name


def test_task_settings_are_validated_in_one_line(tiny_llama, toy_data):
    with pytest.raises(es.EmoscopeError, match="unknown task setting 'shot'"):
        es.Task(tiny_llama, dataset=str(toy_data), shot=2)
    with pytest.raises(es.EmoscopeError, match="shots"):
        es.Task(tiny_llama, dataset=str(toy_data), shots=-1)


def _write(path: Path, rows, header=("Utterance", "Emotion")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _rows(n, offset=0):
    words = {"anger": "furious", "disgust": "gross", "fear": "scared", "joy": "happy", "sadness": "sad",
             "surprise": "wow"}
    return [(f"I feel {words[lab]} about {i + offset}", lab) for i, lab in zip(range(n), list(words) * n)]


def test_split_all_folder_and_mapping_are_used_as_given(tiny_llama, tmp_path):
    meld = tmp_path / "meld"
    meld.mkdir()
    for split, n in (("train", 30), ("dev", 12), ("test", 18)):
        _write(meld / f"{split}_sent_emo.csv", _rows(n, offset=1000 * len(split)))
    cols = {"text_column": "Utterance", "label_column": "Emotion", "per_class": None}
    task = es.Task(tiny_llama, dataset=str(meld), **cols)
    assert [e.text for e in task.examples("test")] == [t for t, _ in _rows(18, 4000)]  # the file, in order
    assert len(task.examples("all")) == 60 and len(task.examples("dev")) == 12
    files = {"train": str(meld / "train_sent_emo.csv"), "test": str(meld / "test_sent_emo.csv")}
    mapped = es.Task(tiny_llama, dataset=files, **cols)
    assert len(mapped.examples("test")) == 18
    with pytest.raises(es.EmoscopeError, match="has no dev split"):
        mapped.examples("dev")
    # split all, with demonstrations: they come from the rows, so those rows are not evaluated
    one = tmp_path / "one.csv"
    _write(one, _rows(36))
    shots = es.Task(tiny_llama, dataset=str(one), shots=2, **cols)
    ex, report = shots.load_examples("all")
    assert len(ex) == 34 and report.dropped["used as a demonstration"] == 2
    assert not {e.id for e in ex} & {d.id for d in shots.demos}


def test_cli_split_all_scores_every_row(tiny_dir, tmp_path):
    from test_cli import cli
    f = tmp_path / "mine.csv"
    _write(f, _rows(30), header=("text", "label"))
    r = cli("evaluate", "--model", tiny_dir, "--dataset", f, "--split", "all", "--per-class", 0, "--out",
            tmp_path / "o",
            "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # --json: nothing else on stdout
    assert res["n"] == 30 and (tmp_path / "o" / "evaluate" / "predictions.parquet").is_file()
