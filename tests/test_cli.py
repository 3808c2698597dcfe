"""The command line: end-to-end on a tiny model, determinism, and one-line errors with exit code 2."""

import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings

import pytest


def cli_process(*args, cwd=None):
    """`python -m emoscope.cli ARGS` in a fresh interpreter, as from a shell."""
    return subprocess.run([sys.executable, "-m", "emoscope.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def cli(*args, cwd=None):
    """`emoscope ARGS` in this process (`cli.main`, which the console script calls; 3-4 s of imports less than
    `cli_process`): stdout, stderr and the exit code, with what a shell's stderr would also show — warnings under
    Python's default filters and log records of WARNING and above, which pytest would otherwise capture."""
    from emoscope.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err), contextlib.chdir(cwd or "."):
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        logging.getLogger().removeHandler(handler)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(["emoscope", *map(str, args)], code, out.getvalue(), err.getvalue() + shown)


def _one_line_error(r, pattern):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert pattern in lines[0], lines[0]


def test_evaluate_end_to_end_and_deterministic(tiny_dir, toy_data, tmp_path):
    args = ["evaluate", "--model", tiny_dir, "--dataset", toy_data, "--per-class", 4, "--shots", 2, "--calibrate",
            "--dtype", "float32"]
    r1 = cli_process(*args, "--out", tmp_path / "a")  # a fresh interpreter and this one: the same bytes
    assert r1.returncode == 0, r1.stderr
    r2 = cli(*args, "--out", tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    a = (tmp_path / "a" / "evaluate" / "result.json").read_bytes()
    assert a == (tmp_path / "b" / "evaluate" / "result.json").read_bytes()
    res = json.loads(a)
    assert res["n"] == 24 and res["labels"] == ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    assert len(res["demonstrations"]) == 2
    import pandas as pd
    df = pd.read_parquet(tmp_path / "a" / "evaluate" / "predictions.parquet")
    assert len(df) == 24 and set(res["correct_ids"]) == set(df.id[df.correct_cal])
    assert "macro-F1" in r1.stdout and "calibrated" in r1.stdout


@pytest.mark.parametrize("args,msg", [
    (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--labels", "anger"], "at least two classes"),
    (["--labels", "anger,awe"], "unknown label(s) awe"),
    (["--per-class", 1000], "larger than available"),
    (["--split", "holdout"], "unknown split"),
])
def test_bad_input_one_line(tiny_dir, toy_data, tmp_path, args, msg):
    # data are checked before the model loads: a valid sample size lets the model's own error show
    opts = {"--model": tiny_dir, "--dataset": toy_data, "--per-class": 4, **dict(zip(args[::2], args[1::2]))}
    flat = [x for kv in opts.items() for x in kv]
    r = cli("evaluate", *flat, "--out", tmp_path / "x")
    _one_line_error(r, msg)
    assert not (tmp_path / "x" / "evaluate").exists()


def test_malformed_file_and_bad_config(tmp_path, tiny_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,\n")
    _one_line_error(cli("evaluate", "--model", tiny_dir, "--dataset", bad), "malformed data file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluate:\n  shots: -1\n")
    _one_line_error(cli("run", "--config", cfg), "evaluate.shots")
    cfg.write_text("evaluate:\n  bogus_key: 1\n")
    _one_line_error(cli("run", "--config", cfg), "bogus_key")
    _one_line_error(cli("run", "--config", tmp_path / "none.yaml"), "config file not found")


def test_train_saes_bad_input(tmp_path, tiny_dir):
    _one_line_error(cli("train-saes", "--model", tiny_dir, "--layers", "7", "--out", tmp_path / "r"),
                    "layer 7 out of range")
    from emoscope.sae import SAE, SAEConfig
    from emoscope.sae.io import save
    save(SAE.init(SAEConfig(d_in=16, d_sae=32, hook_name="blocks.1.hook_resid_post")),
         tmp_path / "pre" / "blocks.1.hook_resid_post")
    r = cli("train-saes", "--model", tiny_dir, "--layers", "1", "--pretrained", tmp_path / "pre", "--out",
            tmp_path / "r")
    _one_line_error(r, "d_in=16")
    assert not (tmp_path / "r" / "saes").exists()


def test_version_and_usage_errors():
    from emoscope import __version__
    r = cli_process("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"emoscope {__version__}"
    r = cli()
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    for run, args, pattern in [(cli_process, ["no-such-command"], "No such command"),
                               (cli, ["evaluate", "--per-class", "abc"], "--per-class"), (cli, ["run"], "--config"),
                               (cli, ["evaluate", "--no-such-option"], "--no-such-option")]:
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and pattern in errors[0] and "Usage:" in r.stderr, (args, r.stderr)


def test_in_process_cli_shows_what_a_shell_would(tmp_path, monkeypatch):
    """`cli` runs in pytest's process: a stray warning or logged warning must still fail a one-line check."""
    from emoscope import config

    real = config.load_config

    def noisy(*a, **k):
        warnings.warn("stray warning", UserWarning)
        logging.getLogger("emoscope.somewhere").warning("stray log line")
        return real(*a, **k)

    monkeypatch.setattr(config, "load_config", noisy)
    r = cli("run", "--config", tmp_path / "none.yaml")
    assert r.returncode == 2 and "stray warning" in r.stderr and "stray log line" in r.stderr, r.stderr
    with pytest.raises(AssertionError):
        _one_line_error(r, "config file not found")


def test_unknown_force_stage_and_set_are_one_line_errors(tmp_path):
    _one_line_error(cli("run", "--config", "quick", "--force", "trace_stage"), "--force trace_stage: unknown stage")
    _one_line_error(cli("run", "--config", "quick", "--set", "phases.fdr"), "--set takes key=value")
    _one_line_error(cli("run", "--config", "quick", "--set", "phases.fdr=2"), "phases.fdr")
    _one_line_error(cli("run", "--config", "no-such-config"),
                    "shipped configs: deploy, deploy-qwen1.5b, full, full-smollm2, gemma2-2b-gemmascope, quick")


def test_plain_progress_for_logs():
    import io
    from emoscope.report.console import PlainProgress
    buf = io.StringIO()
    p = PlainProgress("saes", total=100, every=0.0, stream=buf)
    p(25)
    p(75)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("saes: 25/100 done, ") and "/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("saes: 100/100 done")
    slow = PlainProgress("audit", total=11, every=0.0, stream=buf, heartbeat=None)
    slow.start -= 960  # two candidates in 16 minutes: 8 min each, not "0.00/s"
    slow(2)
    assert buf.getvalue().splitlines()[-1].startswith("audit: 2/11 done, 8m00s each, 16m00s elapsed, ETA 1h12m")


def test_plain_progress_speaks_while_the_work_does_not_advance():
    """A long forward or load between advances still puts a line in the log every `heartbeat` seconds, and the
    heartbeat ends with the progress object."""
    import gc
    import io
    import time
    from emoscope.report.console import PlainProgress
    buf = io.StringIO()
    p = PlainProgress("saes", total=10, every=100.0, stream=buf, heartbeat=0.2)
    p(1)  # within `every`: no line
    time.sleep(0.7)
    beats = buf.getvalue().splitlines()
    assert len(beats) >= 2 and all(b.startswith("saes: 1/10 done") and b.endswith("(working)") for b in beats)
    del p
    gc.collect()
    time.sleep(0.4)
    n = len(buf.getvalue().splitlines())
    time.sleep(0.5)
    assert len(buf.getvalue().splitlines()) == n
    quiet = io.StringIO()
    PlainProgress("x", stream=quiet, heartbeat=None)(1)
    assert quiet.getvalue() == ""


def test_internal_error_is_one_line_pointing_at_the_saved_traceback(tmp_path, tiny_dir, toy_data, monkeypatch, capsys):
    import yaml

    from emoscope import cli as app
    from emoscope.stages import evaluate as evaluate_stage

    def planted_bug(*a, **k):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(evaluate_stage, "evaluate", planted_bug)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)},
                                   "stages": ["evaluate"],
                                   "evaluate": {"data": {"dataset": str(toy_data), "per_class": 4}}}))
    with pytest.raises(SystemExit) as e:
        app.main(["run", "--config", str(cfg)])
    assert e.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "planted bug" in errors[0] and str(tmp_path / "run" / "run.log") in errors[0]
    assert "RuntimeError: planted bug" in (tmp_path / "run" / "run.log").read_text()
    assert not (tmp_path / "run" / ".lock").exists() and not (tmp_path / "run" / "evaluate").exists()
