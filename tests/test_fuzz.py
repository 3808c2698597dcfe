"""Fuzzing the promises on bad input: malformed configs, data files and command lines end in a result or
in one `error:` line with exit code 2 — never a traceback, never a half-written folder."""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoscope.config import config_keys, load_config
from emoscope.data import LoadReport, read_table
from emoscope.errors import EmoscopeError

KEYS = [k for k, _, _ in config_keys()] + ["bogus", "evaluate.model.name", "saes.train", "audit.candidates.0"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _nest(pairs):
    out = {}
    for key, value in pairs:
        node, parts = out, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    return out


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), scalars), min_size=1, max_size=6))
def test_configs_validate_or_fail_in_one_line(tmp_path_factory, pairs):
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(yaml.safe_dump(_nest(pairs)))
    try:
        load_config(f)
    except EmoscopeError as e:
        assert "\n" not in str(e)


@FAST
@given(st.binary(max_size=200))
def test_config_bytes_never_crash(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_bytes(data)
    try:
        load_config(f)
    except EmoscopeError as e:
        assert "\n" not in str(e)


cells = st.text(alphabet=string.printable + "\u2028\ufeff\"é", max_size=15)


@FAST
@given(st.sampled_from([".csv", ".tsv", ".jsonl"]), st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6),
       st.booleans())
def test_data_files_load_or_fail_in_one_line(tmp_path_factory, suffix, rows, header):
    f = tmp_path_factory.mktemp("data") / f"d{suffix}"
    sep = "\t" if suffix == ".tsv" else ","
    lines = (["text" + sep + "label"] if header else []) + [sep.join(r) for r in rows]
    f.write_text("\n".join(lines), encoding="utf-8")
    try:
        for e in read_table(f, LoadReport(str(f))):
            assert e.text.strip() and e.label
    except EmoscopeError as e:
        assert "\n" not in str(e)


COMMANDS = ["evaluate", "train-saes", "phases", "trace", "steer", "run", "audit", "classify", "report", "summarize",
            "config-keys", "bogus", "--version"]
OPTIONS = ["--model", "--dataset", "--split", "--per-class", "--shots", "--seed", "--device", "--dtype", "--set",
           "--config", "--force", "--layers", "--profile", "--stage", "--json", "--fdr", "--per-emotion", "--bogus"]
VALUES = ["-1", "0", "abc", "nan", "1e30", "x=y", "evaluate.seed=-1", "all", "test", "cuda:9", "int8", "[1,2]", "~",
          "", "quick.yaml", "phases.fdr=2"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COMMANDS), st.lists(st.tuples(st.sampled_from(OPTIONS), st.sampled_from(VALUES)), max_size=4))
def test_command_lines_end_in_exit_0_or_one_error_line(tmp_path_factory, capsys, command, opts):
    from emoscope import cli
    d = tmp_path_factory.mktemp("cli")
    argv = [command] + [x for kv in opts for x in kv]
    # nothing here may load a model or start a pipeline: the model is missing, the run directory new
    if command in ("evaluate", "train-saes"):
        argv += ["--model", str(d / "no-model"), "--out", str(d / "out")]
    if command in ("phases", "trace", "steer", "report", "summarize"):
        argv.insert(1, str(d / "no-run"))
    if command in ("run", "audit"):
        argv += ["--config", str(d / "none.yaml")]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if e.value.code == 2 and "Usage:" not in err:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, (argv, err)
    assert not (d / "out" / "evaluate").exists() and not any(p.name.startswith(".") for p in d.rglob("*"))
