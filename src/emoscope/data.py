"""Labelled emotion datasets: one small loader per file format, then one label policy for all.

Loaders return `Example`s with every label a row carries (GoEmotions rows can carry several);
`select` applies the policy: which labels form the task, what happens to extra labels (neutral,
love, shame, guilt: dropped or kept as their own classes, never merged), single-label rows only,
balanced seeded sampling. Empty texts are skipped and counted, never crashed on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import EmoscopeError

EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]

# Folder under the data directory, split file names, and the public hub id for users who are online.
BUILTIN = {
    "goemotions_ekman": {"splits": {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
                         "hub": "google-research-datasets/go_emotions"},
    "dair_emotion": {"splits": {"train": "train.txt", "dev": "val.txt", "test": "test.txt"}, "hub": "dair-ai/emotion"},
    "isear": {"splits": {"all": "isear.csv"}, "hub": None},  # one file: split by subject, see _hash_split
}
SPLIT_ALIASES = {"validation": "dev", "val": "dev", "valid": "dev"}
SPLITS = ("train", "dev", "test", "all")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl")


class DataConfig(BaseModel):
    """Which labelled texts form the task, and how rows become examples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    dataset: str | dict[str, str] = "goemotions_ekman"
    """goemotions_ekman, isear, dair_emotion, a CSV/TSV/JSONL file, a folder of train/dev/test files (MELD), or a
    mapping split -> file."""
    split: str = "test"
    """Split to evaluate: train, dev, test, or all (every row)."""
    data_dir: str | None = None
    """Folder holding the dataset folders (else $EMOSCOPE_DATA, ../shared/data)."""
    labels: list[str] | None = None
    """Task labels; None = the Ekman six that the data has."""
    extra: Literal["drop", "keep"] = "drop"
    """Other labels of the data (neutral, love, ...): drop the rows or keep as classes."""
    multi_label: Literal["drop", "first"] = "drop"
    """Rows with several labels: drop them, or keep their first label."""
    per_class: int | None = Field(50, ge=1)
    """Balanced sample size per class; None = every row."""
    text_column: str = "text"
    """Text column of a CSV/TSV/JSONL file (MELD: Utterance)."""
    label_column: str = "label"
    """Label column of a CSV/TSV/JSONL file (MELD: Emotion)."""

# GoEmotions' 28 fine labels -> Ekman, from the dataset authors' ekman_mapping.json (used for the hub copy).
GOEMOTIONS_TO_EKMAN = {
    "anger": ["anger", "annoyance", "disapproval"],
    "disgust": ["disgust"],
    "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride",
            "admiration", "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
    "neutral": ["neutral"],
}


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    labels: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.labels[0]


@dataclass
class LoadReport:
    """What a loader skipped or dropped, so nothing disappears silently."""

    source: str
    skipped_empty: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, why: str, n: int = 1) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + n


def _malformed(path: Path, line: int, what: str) -> EmoscopeError:
    return EmoscopeError(f"malformed data file {path}:{line}: {what}")


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, a byte-order mark dropped; a decoding error names its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _malformed(path, line, f"not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_lines(path: Path) -> list[str]:
    """Lines split on \n (and \r\n) only: U+2028 and other Unicode line breaks inside a text stay in it."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# ----------------------------------------------------------------------------- one loader per format
def read_goemotions(path: Path, report: LoadReport) -> list[Example]:
    """TSV, no header: text, comma-separated label ids (index into labels.txt), comment id."""
    names_file = path.parent / "labels.txt"
    if not names_file.exists():
        raise EmoscopeError(f"missing {names_file} (label names for {path.name})")
    names = [n.strip() for n in _read_lines(names_file) if n.strip()]
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise _malformed(path, i, f"expected 3 tab-separated fields, found {len(parts)}")
        text, ids, cid = parts
        try:
            labels = tuple(names[int(j)] for j in ids.split(","))
        except (ValueError, IndexError):
            raise _malformed(path, i, f"unknown label id(s) '{ids}' (labels.txt has {len(names)} labels)") from None
        if not text.strip():
            report.skipped_empty += 1
            continue
        out.append(Example(cid, text, labels))
    return out


def read_isear(path: Path, report: LoadReport) -> list[Example]:
    """`|`-separated, header row. Label in `Field1`; the text `SIT` runs from field 40 to the last two
    fields, since ~160 texts contain a stray `|` (an old line break). `á` also marks old line breaks."""
    lines = _read_lines(path)
    if not lines:
        raise _malformed(path, 1, "empty file")
    header = lines[0].split("|")
    if "Field1" not in header or "SIT" not in header:
        raise _malformed(path, 1, "header lacks the Field1 and SIT columns")
    i_label, i_text, i_id, i_key = (header.index(c) for c in ("Field1", "SIT", "ID", "MYKEY"))
    out = []
    for i, line in enumerate(lines[1:], 2):
        parts = line.split("|")
        if len(parts) < len(header):
            raise _malformed(path, i, f"expected at least {len(header)} '|'-separated fields, found {len(parts)}")
        text = "|".join(parts[i_text: len(parts) - (len(header) - 1 - i_text)])
        text = " ".join(text.replace("á", " ").split())
        if not text:
            report.skipped_empty += 1
            continue
        # id = subject-report: each subject (ID) wrote one report per emotion
        out.append(Example(f"{parts[i_id]}-{parts[i_key]}", text, (parts[i_label].strip().lower(),)))
    return out


def read_dair(path: Path, report: LoadReport) -> list[Example]:
    """`text;label` lines; a `text;label_name` header line may come first."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if i == 1 and line.strip() == "text;label_name":
            continue
        text, sep, label = line.rpartition(";")
        if not sep or not label.strip():
            raise _malformed(path, i, "expected 'text;label'")
        if not text.strip():
            report.skipped_empty += 1
            continue
        out.append(Example(f"{path.stem}-{i}", text, (label.strip().lower(),)))
    return out


def read_table(path: Path, report: LoadReport, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """Generic CSV / TSV / JSONL with named text and label columns (MELD: `Utterance`, `Emotion`)."""
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(_read_lines(path), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise _malformed(path, i, f"invalid JSON ({e.msg})") from None
    else:
        rows = _read_csv(path)
    if rows:
        cols = rows[0][1].keys() if isinstance(rows[0][1], dict) else []
        if text_col not in cols or label_col not in cols:
            raise _malformed(path, rows[0][0], f"needs columns '{text_col}' and '{label_col}', found {sorted(cols)}")
    out = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise _malformed(path, i, "each JSONL line must be an object")
        text, label = row.get(text_col), row.get(label_col)
        if label is None or not str(label).strip():
            raise _malformed(path, i, f"empty or missing label in column '{label_col}'")
        if text is None or not str(text).strip():
            report.skipped_empty += 1
            continue
        rid = str(row.get("id", row.get("Sr No.", i)))
        out.append(Example(rid, str(text), (str(label).strip().lower(),)))
    return out


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a CSV or TSV with a header. TSV is read without quote processing: a text starting
    with a quote is text, not the start of a field that swallows the following rows."""
    tsv = path.suffix in (".tsv", ".tab")
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = []
    try:
        for row in reader:
            if None in row:
                raise _malformed(path, reader.line_num, f"more fields than the header's {len(reader.fieldnames)}")
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise _malformed(path, reader.line_num, str(e)) from None
    return rows


# ----------------------------------------------------------------------------- locating files
def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where datasets are looked for, in order: --data-dir, $EMOSCOPE_DATA, ../shared/data."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get("EMOSCOPE_DATA"):
        dirs.append(Path(os.environ["EMOSCOPE_DATA"]))
    dirs.append(Path.cwd().parent / "shared" / "data")
    repo = Path(__file__).resolve().parents[2]  # src/emoscope -> repo root (editable installs)
    dirs.append(repo.parent / "shared" / "data")
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def _hash_split(key: str) -> str:
    """A fixed 70/10/20 train/dev/test split by hash, for datasets that ship one file. ISEAR hashes the
    subject id, so all reports of one person land in one split (no leakage of a writer's style)."""
    b = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if b < 70 else "dev" if b < 80 else "test"


def load_split(dataset: str | dict, split: str = "test", data_dir: str | Path | None = None,
               text_col: str = "text", label_col: str = "label") -> tuple[list[Example], LoadReport]:
    """All examples of one split (or of every split: `all`), with every label, of a builtin dataset, a
    file, a folder of split files, or a mapping split -> file."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise EmoscopeError(f"unknown split '{split}': choose {', '.join(SPLITS)}")
    if isinstance(dataset, str) and dataset in BUILTIN:
        return _load_builtin(dataset, split, data_dir)
    files = split_files(dataset)
    if files is None:  # one file: split by hash of the row id, or every row
        path = Path(dataset).expanduser()
        report = LoadReport(str(path))
        rows = read_table(path, report, text_col, label_col)
        return (rows if split == "all" else [r for r in rows if _hash_split(r.id) == split]), report
    wanted = list(files) if split == "all" else [split]
    missing = [w for w in wanted if w not in files]
    if missing:
        raise EmoscopeError(f"dataset {dataset} has no {missing[0]} split (it has {', '.join(files)})")
    _check_columns(files, text_col, label_col)  # every split file, not only the ones read now
    report, rows = LoadReport(", ".join(str(files[w]) for w in wanted)), []
    for w in wanted:
        # ids carry the file's split: line numbers repeat across files
        rows += [Example(f"{w}:{e.id}", e.text, e.labels) for e in read_table(files[w], report, text_col, label_col)]
    return rows, report


def _check_columns(files: dict[str, Path], text_col: str, label_col: str) -> None:
    """Every split file has the text and label columns the task reads (its header, or its first JSONL object)."""
    for split, path in files.items():
        if path.suffix == ".jsonl":
            first = next((line for line in _read_lines(path) if line.strip()), None)
            try:
                obj = json.loads(first) if first is not None else None
            except json.JSONDecodeError:
                continue  # read_table names the malformed line when the split is read
            cols = list(obj) if isinstance(obj, dict) else None
        else:
            tsv = path.suffix in (".tsv", ".tab")
            cols = next(csv.reader(io.StringIO(_read_text(path)), delimiter="\t" if tsv else ","), None)
        missing = [c for c in (text_col, label_col) if cols is not None and c not in cols]
        if missing:
            raise EmoscopeError(f"{path} ({split} split) has no column '{missing[0]}' (its columns: "
                                f"{', '.join(cols)}); every split file needs '{text_col}' and '{label_col}'")


def split_files(dataset: str | dict) -> dict[str, Path] | None:
    """The split -> file mapping of a user dataset: given as a mapping, found in a folder by file name
    (train / dev, val, valid, validation / test, as MELD's `dev_sent_emo.csv`), or None for one file."""
    if isinstance(dataset, dict):
        out = {SPLIT_ALIASES.get(k, k): Path(v).expanduser() for k, v in dataset.items()}
        bad = [k for k in out if k not in SPLITS[:3]]
        if bad:
            raise EmoscopeError(f"dataset mapping: unknown split '{bad[0]}': use train, dev and test")
        for k, f in out.items():
            if not f.is_file():
                raise EmoscopeError(f"dataset mapping: {k} file not found: {f}")
        return out
    path = Path(dataset).expanduser()
    if not path.exists():
        raise EmoscopeError(f"unknown dataset '{dataset}': not one of {', '.join(BUILTIN)} and no such file or folder")
    if path.is_file():
        return None
    found: dict[str, list[Path]] = {}
    for f in sorted(path.iterdir()):
        words = set(f.stem.lower().replace("-", "_").split("_"))
        for split in ("train", "dev", "test"):
            names = {split} | {a for a, s in SPLIT_ALIASES.items() if s == split}
            if f.suffix in TABLE_SUFFIXES and words & names:
                found.setdefault(split, []).append(f)
    if not found:
        raise EmoscopeError(f"folder {path} holds no train/dev/test CSV, TSV or JSONL files")
    twice = [s for s, fs in found.items() if len(fs) > 1]
    if twice:
        raise EmoscopeError(f"folder {path}: several files for the {twice[0]} split "
                            f"({', '.join(f.name for f in found[twice[0]])})")
    return {s: fs[0] for s, fs in found.items()}


def _load_builtin(dataset: str, split: str, data_dir) -> tuple[list[Example], LoadReport]:
    spec = BUILTIN[dataset]
    tried = []
    for d in data_dirs(data_dir):
        folder = d / dataset
        tried.append(str(folder))
        if not folder.is_dir():
            continue
        reader = {"goemotions_ekman": read_goemotions, "isear": read_isear, "dair_emotion": read_dair}[dataset]
        if "all" in spec["splits"]:  # one file, split by hash of the subject
            path = folder / spec["splits"]["all"]
            report = LoadReport(str(path))
            rows = reader(_existing(path), report)
            return (rows if split == "all" else [r for r in rows if _hash_split(r.id.split("-")[0]) == split]), report
        names = list(spec["splits"].values()) if split == "all" else [spec["splits"][split]]
        report, rows = LoadReport(", ".join(str(folder / n) for n in names)), []
        for n in names:
            rows += reader(_existing(folder / n), report)
        return rows, report
    if spec["hub"] and split != "all":
        return _load_hub(dataset, spec["hub"], split, tried)
    raise EmoscopeError(f"dataset '{dataset}' not found; looked in: {', '.join(tried)} (set --data-dir or "
                        "EMOSCOPE_DATA)")


def check(cfg: DataConfig) -> None:
    """Read the configured data once, so that a bad path, file or label fails before a model is loaded."""
    train, report = load_split(cfg.dataset, "train", cfg.data_dir, cfg.text_column, cfg.label_column)
    classes = label_set(label_source(cfg, train), cfg.labels, cfg.extra)
    rows, report = load_split(cfg.dataset, cfg.split, cfg.data_dir, cfg.text_column, cfg.label_column)
    check_classes(rows, classes, cfg, cfg.split)
    select(rows, classes, report, cfg.multi_label, cfg.per_class, 0, cfg.split)


def label_source(cfg: DataConfig, train: list[Example]) -> list[Example]:
    """The rows the task's labels come from: the train split, or every row with split all (which scores them all)."""
    if cfg.split != "all":
        return train
    return load_split(cfg.dataset, "all", cfg.data_dir, cfg.text_column, cfg.label_column)[0]


def check_classes(rows: list[Example], classes: list[str], cfg: DataConfig, split: str) -> None:
    """A label the evaluated rows have that the label policy would make a class, but that the labels' source lacks,
    would silently drop that class and its rows: refused, naming it (named labels are the user's choice)."""
    if cfg.labels is not None:
        return
    present = sorted({lab for e in rows for lab in e.labels})
    lost = [lab for lab in present if lab not in classes and (lab in EKMAN or cfg.extra == "keep")]
    if lost:
        n = {lab: sum(lab in e.labels for e in rows) for lab in lost}
        raise EmoscopeError(f"the {split} rows have label(s) {', '.join(f'{k} ({v} rows)' for k, v in n.items())} "
                            "that the train split, where the task's labels come from, lacks: they would be dropped; "
                            "give the labels (--labels / data.labels) or add train rows with them")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise EmoscopeError(f"missing data file {path}")
    return path


def _load_hub(dataset: str, hub_id: str, split: str, tried: list[str]) -> tuple[list[Example], LoadReport]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise EmoscopeError(f"dataset '{dataset}' not found; looked in: {', '.join(tried)}; "
                            f"the hub copy '{hub_id}' needs `pip install emoscope[hub]`") from None
    hub_split = {"dev": "validation"}.get(split, split)
    try:
        ds = load_dataset(hub_id, "simplified" if dataset == "goemotions_ekman" else None, split=hub_split)
    except Exception as e:  # offline, renamed, ...: name what was tried
        raise EmoscopeError(f"dataset '{dataset}' not found; looked in: {', '.join(tried)}; hub '{hub_id}': "
                            f"{str(e).splitlines()[0]}") from None
    names = ds.features["label" if dataset == "dair_emotion" else "labels"]
    names = names.names if hasattr(names, "names") else names.feature.names
    report, out = LoadReport(f"hub:{hub_id}"), []
    fine_to_ekman = {f: e for e, fs in GOEMOTIONS_TO_EKMAN.items() for f in fs}
    for i, row in enumerate(ds):
        if dataset == "dair_emotion":
            labels = (names[row["label"]],)
        else:
            labels = tuple(dict.fromkeys(fine_to_ekman[names[j]] for j in row["labels"]))
        if not row["text"].strip():
            report.skipped_empty += 1
            continue
        out.append(Example(str(row.get("id", i)), row["text"], labels))
    return out, report


# ----------------------------------------------------------------------------- label policy
def label_set(examples: list[Example], labels: list[str] | None, extra: str) -> list[str]:
    """The task's classes: the requested labels (default: the Ekman six the data has), plus the
    data's other labels when extra == 'keep'."""
    present = sorted({lab for e in examples for lab in e.labels})
    if labels is None:
        chosen = [lab for lab in EKMAN if lab in present]
    else:
        chosen = [lab.strip().lower() for lab in labels]
        unknown = [lab for lab in chosen if lab not in present]
        if unknown:
            raise EmoscopeError(f"unknown label(s) {', '.join(unknown)}: the data has {', '.join(present)}")
        if len(set(chosen)) != len(chosen):
            raise EmoscopeError(f"duplicate labels in {chosen}")
    if extra == "keep":
        chosen += [lab for lab in present if lab not in chosen]
    elif extra != "drop":
        raise EmoscopeError(f"extra must be 'drop' or 'keep', got '{extra}'")
    if len(chosen) < 2:
        raise EmoscopeError(f"a label set needs at least two classes, got {chosen}")
    return chosen


def select(examples: list[Example], classes: list[str], report: LoadReport, multi_label: str = "drop",
           per_class: int | None = None, seed: int = 0, split: str = "") -> list[Example]:
    """Keep rows whose label is one of `classes`; single-label rows unless multi_label == 'first';
    then, if per_class is set, a seeded balanced sample in a seeded order."""
    keep = []
    for e in examples:
        if len(e.labels) > 1 and multi_label == "drop":
            report.drop("multi-label")
            continue
        if e.label not in classes:
            report.drop(f"label '{e.label}' not in task")
            continue
        keep.append(Example(e.id, e.text, (e.label,)))
    if per_class is None:
        return keep
    rng = random.Random(seed)
    by = {c: [e for e in keep if e.label == c] for c in classes}
    short = {c: len(v) for c, v in by.items() if len(v) < per_class}
    if short:
        have = ", ".join(f"{c}: {n}" for c, n in short.items())
        raise EmoscopeError(f"--per-class {per_class} is larger than available in {split or 'the split'} ({have})")
    out = []
    for c in classes:
        rows = sorted(by[c], key=lambda e: e.id)
        rng.shuffle(rows)
        out += rows[:per_class]
    rng.shuffle(out)
    return out


def demonstrations(train: list[Example], classes: list[str], k: int, seed: int = 0) -> list[Example]:
    """k few-shot examples from the train split, cycling through the classes so each appears
    (k >= number of classes), in a seeded order. Deterministic for a given seed."""
    if k <= 0:
        return []
    rng = random.Random(seed + 7919)
    pools = {c: sorted((e for e in train if e.label == c and len(e.text) <= 200), key=lambda e: e.id) for c in classes}
    for c, pool in pools.items():
        if not pool:
            raise EmoscopeError(f"no train example of '{c}' for few-shot demonstrations")
        rng.shuffle(pool)
    order = list(classes)
    rng.shuffle(order)
    picks = [(pool := pools[order[i % len(order)]])[(i // len(order)) % len(pool)] for i in range(k)]
    rng.shuffle(picks)
    return picks
