"""Loaders on the real files and the label policy."""

import collections
import json

import pytest

from emoscope.data import EKMAN, LoadReport, demonstrations, label_set, load_split, read_isear, read_table, select
from emoscope.errors import EmoscopeError


def test_goemotions_counts_and_labels(shared_data):
    rows, rep = load_split("goemotions_ekman", "train", shared_data)
    assert len(rows) == 43410 and rep.skipped_empty == 0
    labels = {lab for r in rows for lab in r.labels}
    assert labels == set(EKMAN) | {"neutral"}
    assert sum(len(r.labels) > 1 for r in rows) > 1000  # multi-label rows are kept by the loader
    dev, _ = load_split("goemotions_ekman", "validation", shared_data)
    assert len(dev) == 5426


def test_isear_stray_bar_rows(shared_data):
    path = shared_data / "isear" / "isear.csv"
    rows = read_isear(path, LoadReport(str(path)))
    assert len(rows) == 7666
    assert collections.Counter(r.label for r in rows)["disgust"] == 1096
    assert {r.label for r in rows} == {"anger", "disgust", "fear", "joy", "sadness", "shame", "guilt"}
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    stray = [i for i, lab in enumerate(lines) if lab.count("|") > 42]
    assert len(stray) > 100
    for i in stray[:20]:
        r = rows[i]
        assert "|" in r.text and r.label in EKMAN + ["shame", "guilt"]
        assert not r.text.endswith("|") and "á" not in r.text
    # splits are disjoint and cover the file
    ids = [set(r.id for r in load_split("isear", s, shared_data)[0]) for s in ("train", "dev", "test")]
    assert sum(map(len, ids)) == 7666 and not (ids[0] & ids[2])
    subjects = [{i.split("-")[0] for i in s} for s in ids]
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2])


def test_dair_header_and_labels(shared_data):
    tr, _ = load_split("dair_emotion", "train", shared_data)
    te, _ = load_split("dair_emotion", "test", shared_data)
    assert len(tr) == 16000 and len(te) == 2000
    assert {r.label for r in tr} == {"sadness", "joy", "love", "anger", "fear", "surprise"}
    assert label_set(tr, None, "drop") == ["anger", "fear", "joy", "sadness", "surprise"]
    assert label_set(tr, None, "keep")[-1] == "love"


def test_meld_and_jsonl(tmp_path):
    (tmp_path / "meld.csv").write_text('Sr No.,Utterance,Speaker,Emotion\n1,"Oh, '
                                       'great.",Joey,Joy\n2,"",Ross,anger\n3,No way!,Rachel,surprise\n')
    rep = LoadReport("x")
    rows = read_table(tmp_path / "meld.csv", rep, "Utterance", "Emotion")
    assert [r.label for r in rows] == ["joy", "surprise"] and rep.skipped_empty == 1
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a", "label": "joy"}) + "\n" + "{bad\n")
    with pytest.raises(EmoscopeError, match=r"d.jsonl:2: invalid JSON"):
        read_table(tmp_path / "d.jsonl", LoadReport("x"))


def test_bad_inputs(tmp_path, shared_data):
    with pytest.raises(EmoscopeError, match="unknown dataset"):
        load_split("nope", "test")
    bad = tmp_path / "goemotions_ekman"
    bad.mkdir()
    (bad / "labels.txt").write_text("anger\njoy\n")
    (bad / "test.tsv").write_text("fine text\t0\tid1\nbroken line without tabs\n")
    with pytest.raises(EmoscopeError, match=r"test.tsv:2: expected 3 tab-separated"):
        load_split("goemotions_ekman", "test", tmp_path)
    (bad / "test.tsv").write_text("text\t7\tid1\n")
    with pytest.raises(EmoscopeError, match="unknown label id"):
        load_split("goemotions_ekman", "test", tmp_path)
    (bad / "test.tsv").unlink()
    with pytest.raises(EmoscopeError, match="missing data file"):
        load_split("goemotions_ekman", "test", tmp_path)
    rows, rep = load_split("goemotions_ekman", "test", shared_data)
    with pytest.raises(EmoscopeError, match="unknown label"):
        label_set(rows, ["anger", "love"], "drop")
    with pytest.raises(EmoscopeError, match="at least two classes"):
        label_set(rows, ["anger"], "drop")
    with pytest.raises(EmoscopeError, match="larger than available.*disgust"):
        select(rows, EKMAN, rep, per_class=500, split="test")


def test_missing_dataset_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOSCOPE_DATA", str(tmp_path / "envdir"))
    monkeypatch.chdir(tmp_path)
    import emoscope.data as d
    monkeypatch.setattr(d, "data_dirs", lambda data_dir=None: [tmp_path / "a", tmp_path / "envdir"])
    with pytest.raises(EmoscopeError) as e:
        d.load_split("isear", "test")
    assert str(tmp_path / "a" / "isear") in str(e.value) and "envdir" in str(e.value)


def test_empty_rows_skipped_and_counted(tmp_path):
    (tmp_path / "dair.txt").write_text("text;label_name\nhello there;joy\n   ;sadness\nbye;sadness\n")
    from emoscope.data import read_dair
    rep = LoadReport("x")
    rows = read_dair(tmp_path / "dair.txt", rep)
    assert len(rows) == 2 and rep.skipped_empty == 1


def test_select_balanced_and_deterministic(shared_data):
    rows, rep = load_split("goemotions_ekman", "test", shared_data)
    a = select(rows, EKMAN, rep, per_class=20, seed=3)
    b = select(rows, EKMAN, LoadReport("x"), per_class=20, seed=3)
    c = select(rows, EKMAN, LoadReport("x"), per_class=20, seed=4)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    assert collections.Counter(e.label for e in a) == {lab: 20 for lab in EKMAN}
    assert rep.dropped["multi-label"] > 0
    tr, trep = load_split("goemotions_ekman", "train", shared_data)
    pool = select(tr, EKMAN, trep)
    d1, d2 = demonstrations(pool, EKMAN, 6, 0), demonstrations(pool, EKMAN, 6, 0)
    assert [e.id for e in d1] == [e.id for e in d2] and {e.label for e in d1} == set(EKMAN)
    test_ids = {e.id for e in rows}
    assert not test_ids & {e.id for e in d1}


def test_hub_fallback_maps_goemotions_to_ekman(tmp_path, monkeypatch):
    """With no local copy, the public hub id is used (here a stand-in `datasets` module, no network)."""
    import sys
    import types

    import emoscope.data as d

    fine = ["admiration", "anger", "annoyance", "disgust", "neutral", "curiosity"]

    class Feat:
        def __init__(self, names):
            self.feature = types.SimpleNamespace(names=names)

    class FakeDS(list):
        features = {"labels": Feat(fine)}

    rows = FakeDS([{"id": "a", "text": "so cool", "labels": [0]}, {"id": "b", "text": "ugh", "labels": [1, 2]},
                   {"id": "c", "text": "  ", "labels": [3]}, {"id": "d", "text": "hm?", "labels": [5, 4]}])
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda hub, name, split: calls.append((hub, name, split)) or rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(d, "data_dirs", lambda data_dir=None: [tmp_path])
    out, rep = d.load_split("goemotions_ekman", "dev")
    assert calls == [("google-research-datasets/go_emotions", "simplified", "validation")]
    assert [e.labels for e in out] == [("joy",), ("anger",), ("surprise", "neutral")]
    assert rep.skipped_empty == 1 and rep.source.startswith("hub:")


def test_files_are_read_as_written(tmp_path):
    """TSV without quote processing (an unmatched quote no longer swallows rows), a UTF-8 byte-order mark
    tolerated, JSONL split on newlines only (U+2028 inside a string), decode errors named by line."""
    from emoscope.data import LoadReport, read_table
    from emoscope.errors import EmoscopeError

    tsv = tmp_path / "q.tsv"
    tsv.write_text('text\tlabel\n"oh no, it is\tfear\nfine day\tjoy\nsad "quoted" day\tsadness\n')
    rows = read_table(tsv, LoadReport("x"))
    assert [r.text for r in rows] == ['"oh no, it is', "fine day", 'sad "quoted" day']
    bom = tmp_path / "b.csv"
    bom.write_bytes("\ufeffid,text,label\na,I am happy,joy\n".encode())
    assert [(r.id, r.label) for r in read_table(bom, LoadReport("x"))] == [("a", "joy")]
    jl = tmp_path / "u.jsonl"
    jl.write_text('{"text": "line\\u2028 break", "label": "joy"}\n{"text": "x", "label": "fear"}\n'.replace(
        "\\u2028", "\u2028"))
    assert [r.label for r in read_table(jl, LoadReport("x"))] == ["joy", "fear"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,joy\n\xff\xfe,fear\n")
    with pytest.raises(EmoscopeError, match=r"bad.csv:3: not UTF-8"):
        read_table(bad, LoadReport("x"))
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nhello,joy,surplus\n")
    with pytest.raises(EmoscopeError, match=r"extra.csv:2: more fields than the header"):
        read_table(extra, LoadReport("x"))


# issue 30: data folders read consistently, and no class lost from "every row"
def _csv(path, rows, header=("text", "label")):
    path.write_text(",".join(header) + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


def test_every_split_file_needs_the_tasks_columns(tmp_path):
    rows = [(f"text {i}", lab) for i, lab in enumerate(EKMAN)]
    _csv(tmp_path / "train.csv", rows)
    _csv(tmp_path / "dev.csv", rows, header=("text", "emotion"))  # never read when scoring test
    _csv(tmp_path / "test.csv", rows)
    with pytest.raises(EmoscopeError, match=r"dev\.csv \(dev split\) has no column 'label'"):
        load_split(str(tmp_path), "test")


def test_split_all_scores_every_row_and_keeps_every_class(tmp_path, tiny_llama):
    from emoscope.models import ModelView  # noqa: F401  (the tiny model is a ModelView)
    from emoscope.task import Task
    f = _csv(tmp_path / "own.csv", [(f"row {i} {lab}", lab) for lab in EKMAN for i in range(2)])
    task = Task(tiny_llama, dataset=str(f), split="all", per_class=2)
    assert task.classes == EKMAN
    ex = task.examples()
    assert len(ex) == 12 and collections.Counter(e.label for e in ex) == {lab: 2 for lab in EKMAN}


def test_a_class_missing_from_the_label_source_is_named(tmp_path, tiny_llama):
    from emoscope.task import Task
    _csv(tmp_path / "train.csv", [(f"t {i} {lab}", lab) for lab in EKMAN if lab != "sadness" for i in range(2)])
    _csv(tmp_path / "test.csv", [(f"e {i} {lab}", lab) for lab in EKMAN for i in range(2)])
    task = Task(tiny_llama, dataset=str(tmp_path), per_class=2)
    with pytest.raises(EmoscopeError, match=r"sadness \(2 rows\)"):
        task.examples()
    # named labels are the user's choice: no error
    assert len(Task(tiny_llama, dataset=str(tmp_path), per_class=2, labels=["joy", "anger"]).examples()) == 4
