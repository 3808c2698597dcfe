"""Every setting is validated where it enters, with the same rules from YAML, the CLI and the API: one
`error:` line naming the key and what is allowed, before any expensive work."""

import pytest
import yaml

import emoscope as es
from emoscope.config import load_config
from test_cli import _one_line_error, cli


@pytest.mark.parametrize("override,key", [
    ("model.device=xyz", "model.device"), ("model.dtype=int8", "model.dtype"), ("evaluate.seed=-1", "evaluate.seed"),
    ("evaluate.data.per_class=-3", "evaluate.data.per_class"), ("steer.strengths=[1.5, .nan]", "steer.strengths"),
    ("steer.features_per_emotion=[-1]", "steer.features_per_emotion"), ("steer.features_per_emotion=[]", "steer"),
    ("saes.train.mix=[0.5, -1, 0.5]", "saes.train.mix"), ("audit.candidates=[]", "audit.candidates"),
    ("trace.seed=-2", "trace.seed"), ("steer.dose=[.inf]", "steer.dose"),
])
def test_bad_values_are_refused_at_load(override, key):
    with pytest.raises(es.EmoscopeError, match=key.replace(".", r"\.")):
        load_config("quick", [override])


def test_same_rules_from_cli_and_api(tmp_path, tiny_dir, toy_data):
    _one_line_error(cli("run", "--config", "quick", "--set", "evaluate.seed=-1"), "evaluate.seed")
    _one_line_error(cli("evaluate", "--model", tiny_dir, "--dataset", toy_data, "--seed", -1), "seed")
    _one_line_error(cli("evaluate", "--model", tiny_dir, "--dataset", toy_data, "--device", "xyz"), "model.device")
    with pytest.raises(es.EmoscopeError, match="seed"):
        es.TaskConfig.build(seed=-1)
    with pytest.raises(es.EmoscopeError, match="phases.fdr"):
        es.phases(None, {}, None, {"fdr": 2})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    _one_line_error(cli("run", "--config", empty), "is empty")
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump(["evaluate"]))
    _one_line_error(cli("run", "--config", listed), "must be a mapping")


def test_sae_k_and_mix_are_checked_before_training(tiny_llama, shared_data):
    with pytest.raises(es.EmoscopeError, match=r"saes.train.k = 999 is more than the 64 features"):
        es.train_saes(tiny_llama, layers=[1], expansion=2, k=999)
    with pytest.raises(es.EmoscopeError, match="must sum to more than 0"):
        es.train_saes(tiny_llama, layers=[1], expansion=2, k=4, mix=[0, 0, 0])


def test_mix_values_are_weights(tiny_llama, shared_data):
    """(1, 1, 2) means 25% / 25% / 50% task prompts; read as thresholds (as before) it meant 100% WikiText."""
    from emoscope.data import EKMAN
    from emoscope.sae.corpus import sequences
    from emoscope.task.prompts import PromptBuilder, Template
    b = PromptBuilder(tiny_llama.tokenizer, Template(), EKMAN, [], tiny_llama.chat, tiny_llama.max_context)
    head = b.encode(b.prompt(""))[:6]  # every task prompt starts with the instruction's tokens
    stream = sequences(tiny_llama, "train", 128, 0, (1, 1, 2), shared_data)
    prompts = sum(next(stream)[:6] == head for _ in range(400))
    assert 0.42 < prompts / 400 < 0.58, prompts


def test_corrupt_and_foreign_files_are_one_line_errors(tmp_path, tiny_dir, toy_data, tiny_llama):
    """Truncated model files, pickled-only model folders, SAE configs without d_in, junk results in a run
    directory and invalid steering files: each one `error:` line naming the file, exit 2."""
    import json
    import shutil

    from emoscope.config import RunConfig
    from emoscope.interventions.steering import load_steering
    from emoscope.pipeline import run
    from emoscope.sae import SAE, SAEConfig
    from emoscope.sae.io import load, save

    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    _one_line_error(cli("evaluate", "--model", gguf, "--dataset", toy_data, "--per-class", 4), "cannot load model")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    import torch
    torch.save(tiny_llama.model.state_dict(), pickled / "pytorch_model.bin")  # a pickle: refused unless opted in
    _one_line_error(cli("evaluate", "--model", pickled, "--dataset", toy_data, "--per-class", 4),
                    "holds only pickled weights")
    import os
    os.environ["EMOSCOPE_ALLOW_PICKLE"] = "1"
    try:
        assert es.load_model(str(pickled)).n_layers == tiny_llama.n_layers
    finally:
        del os.environ["EMOSCOPE_ALLOW_PICKLE"]
    save(SAE.init(SAEConfig(d_in=32, d_sae=64)), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    for bad, pattern in [({k: v for k, v in cfg.items() if k != "d_in"}, "'d_in' must be a positive integer"),
                         ([1, 2], "must hold a JSON object")]:
        (tmp_path / "sae" / "cfg.json").write_text(json.dumps(bad))
        with pytest.raises(es.EmoscopeError, match=pattern):
            load(tmp_path / "sae")
    run(RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)},
                                  "stages": ["evaluate"], "evaluate": {"data": {"dataset": str(toy_data),
                                                                                "per_class": 2}}}),
        log=lambda s: None)
    ev = tmp_path / "run" / "evaluate"
    good = (ev / "result.json").read_bytes()
    (ev / "result.json").write_text("{not json")
    _one_line_error(cli("report", tmp_path / "run"), "is corrupt")
    _one_line_error(cli("phases", tmp_path / "run"), "result")
    (ev / "result.json").write_text(json.dumps({"stage": "evaluate"}))
    _one_line_error(cli("report", tmp_path / "run"), "cannot read")
    _one_line_error(cli("summarize", tmp_path / "run"), "cannot read")
    (ev / "result.json").write_bytes(good)
    (ev / "predictions.parquet").write_text("junk")
    _one_line_error(cli("report", tmp_path / "run"), "cannot read")
    (tmp_path / "s.json").write_text(json.dumps({"model_name": "m", "edits": [{"layer": 1, "feature": 2}]}))
    with pytest.raises(es.EmoscopeError, match=r"s.json: edits.0.value: Field required"):
        load_steering(tmp_path / "s.json")


def test_unwritable_outputs_are_one_line_errors(tmp_path):
    """An output path under a file or that is a file: one line, nothing half-written."""
    from emoscope.artifacts import atomic_dir
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(es.EmoscopeError, match="cannot write"):
        with atomic_dir(blocker / "evaluate"):
            pass
    with pytest.raises(es.EmoscopeError, match="it exists and is a file"):
        with atomic_dir(blocker):
            pass


def test_read_only_output_folder(tmp_path):
    import os

    from emoscope.artifacts import atomic_dir
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: the read-only case cannot be shown here
        pytest.skip("running as root")
    with pytest.raises(es.EmoscopeError, match="cannot write"):
        with atomic_dir(ro / "evaluate"):
            pass


def test_full_disk_leaves_nothing(tmp_path):
    import errno

    from emoscope.artifacts import atomic_dir
    with pytest.raises(es.EmoscopeError, match="No space left on device"):
        with atomic_dir(tmp_path / "evaluate") as tmp:
            (tmp / "result.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# issue 30: what a setting means, not only its type
@pytest.mark.parametrize("override,key", [
    ("audit.thresholds.max_flip_rate=1.5", "audit.thresholds.max_flip_rate"),  # a gate that cannot fail
    ("audit.thresholds.max_flip_rate=-0.1", "audit.thresholds.max_flip_rate"),
    ("audit.thresholds.max_accuracy_drop=2", "audit.thresholds.max_accuracy_drop"),
    ("audit.thresholds.min_causal_survival=1.01", "audit.thresholds.min_causal_survival"),
    ("audit.thresholds.min_effect_retained=-1", "audit.thresholds.min_effect_retained"),
    ("phases.fdr=1.5", "phases.fdr"),
    ('audit.candidates=[{name: a, precision: int8}, {name: a, precision: int4}]', "audit.candidates"),
    ('model.device_map={"model.layers.0": gpu7}', "model.device_map"),
    ('model.device_map={"model.layers.0": -1}', "model.device_map"),
])
def test_meaningless_values_are_refused_at_load(override, key):
    with pytest.raises(es.EmoscopeError, match=key.replace(".", r"\.")):
        load_config("quick", [override])


def test_duplicate_candidate_names_are_named():
    with pytest.raises(es.EmoscopeError, match="'a' twice"):
        load_config("quick", ['audit.candidates=[{name: a, precision: int8}, {name: a, precision: int4}]'])


def test_a_mapped_device_that_is_not_here_is_one_line(tiny_dir):
    import torch
    n = torch.cuda.device_count()
    with pytest.raises(es.EmoscopeError, match=f"cuda:{n}"):
        es.load_model(es.ModelConfig(name=str(tiny_dir), device_map={"": f"cuda:{n}"}))
    with pytest.raises(es.EmoscopeError, match="GPU index"):
        es.load_model(es.ModelConfig(name=str(tiny_dir), device_map={"": n}))


def test_bare_command_prints_usage_on_stderr_with_exit_2():
    r = cli()
    assert r.returncode == 2 and r.stdout == "" and "Usage" in r.stderr


# ---------------------------------------------------------------- the schema's ranges, drawn from the schema
def _bounds(field):
    """(kind, lo, lo_strict, hi, hi_strict) of a numeric field's documented range, or None."""
    import typing

    import annotated_types as at
    metas, ann = list(field.metadata), field.annotation
    for arg in typing.get_args(ann) or ():  # X | None, with X = Annotated[int/float, Field(ge=..)]
        metas += [m for fi in getattr(arg, "__metadata__", ()) for m in getattr(fi, "metadata", [fi])]
        ann = typing.get_args(arg)[0] if getattr(arg, "__metadata__", None) else ann
    base = ann if ann in (int, float) else next((a for a in typing.get_args(ann) if a in (int, float)), None)
    lo = hi = None
    lo_strict = hi_strict = False
    for m in metas:
        if isinstance(m, (at.Ge, at.Gt)):
            lo, lo_strict = (m.ge, False) if isinstance(m, at.Ge) else (m.gt, True)
        if isinstance(m, (at.Le, at.Lt)):
            hi, hi_strict = (m.le, False) if isinstance(m, at.Le) else (m.lt, True)
    return (base, lo, lo_strict, hi, hi_strict) if base and (lo is not None or hi is not None) else None


def _ranged_keys(model=None, prefix=""):
    from pydantic import BaseModel

    from emoscope.config import RunConfig
    out = []
    for name, field in (model or RunConfig).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _ranged_keys(ann, f"{prefix}{name}.")
        elif (b := _bounds(field)) is not None:
            out.append((f"{prefix}{name}", b))
    return out


RANGED = _ranged_keys()


def test_the_schema_documents_ranges():
    keys = dict(RANGED)
    # the walk sees plain, aliased (Seed, Share) and optional constrained fields
    assert {"evaluate.seed", "audit.thresholds.max_flip_rate", "audit.thresholds.min_effect_retained",
            "phases.fdr", "saes.train.k"} <= set(keys), sorted(keys)
    assert len(RANGED) > 40


def _outside(draw, bounds):
    from hypothesis import strategies as st
    kind, lo, lo_strict, hi, hi_strict = bounds
    sides = ([("lo", lo, lo_strict)] if lo is not None else []) + ([("hi", hi, hi_strict)] if hi is not None else [])
    side, edge, strict = draw(st.sampled_from(sides))
    step = draw(st.integers(0 if strict else 1, 1000)) if kind is int else draw(
        st.floats(0 if strict else 1e-6, 1e6, allow_nan=False))
    if kind is int:
        return int(edge) - step if side == "lo" else int(edge) + step
    return float(edge) - step if side == "lo" else float(edge) + step


def test_out_of_range_values_are_refused_naming_the_key():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        key, bounds = data.draw(st.sampled_from(RANGED))
        value = _outside(data.draw, bounds)
        with pytest.raises(es.EmoscopeError, match=key.replace(".", r"\.")):
            load_config("quick", [f"{key}={value!r}"])
    check()


def test_a_refused_config_leaves_the_run_directory_byte_identical(tmp_path):
    import hashlib
    import random
    run = tmp_path / "run"
    (run / "audit").mkdir(parents=True)
    (run / "audit" / "result.json").write_text('{"failed": []}')
    (run / "run.log").write_text("earlier run\n")
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    before = digest()
    for key, bounds in random.Random(0).sample(RANGED, 2):  # two keys through the command line
        lo, hi = bounds[1], bounds[3]
        value = (lo - 1) if lo is not None else (hi + 1)
        for cmd in ("run", "audit"):
            _one_line_error(cli(cmd, "--config", "quick", "--set", f"run_dir={run}", "--set", f"{key}={value}"), key)
    assert digest() == before


def test_a_bad_model_reference_is_refused_before_the_run_directory_is_touched(tmp_path):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    run.mkdir()
    (run / "run.log").write_text("earlier run\n")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    (tmp_path / "folder").mkdir()
    cases = [(["model.name=missing.gguf"], "GGUF file not found"), ([f"model.name={not_gguf}"], "no GGUF magic"),
             ([f"model.name={tmp_path / 'folder'}"], "without config.json"),
             (["model.name=./no-such-dir"], "Hugging Face id"),
             (["audit.candidates=[{name: shipped, model: /nowhere/x.gguf}]"], "candidate 'shipped'")]
    for (sets, msg), cmd, where in zip(cases[:2], ("run", "audit"), (run, fresh)):  # the command line: one line
        _one_line_error(cli(cmd, "--config", "quick", "--set", f"run_dir={where}", "--set", sets[0]), msg)
    for sets, msg in cases:  # the API's run: refused before the run directory is touched
        with pytest.raises(es.EmoscopeError, match=msg):
            es.run(load_config("quick", [f"run_dir={run}", *sets]))
    assert [p.name for p in run.iterdir()] == ["run.log"] and (run / "run.log").read_text() == "earlier run\n"
    assert not fresh.exists()


def test_zero_empty_and_machine_sized_values_are_validated_not_skipped(tiny_dir, toy_data):
    """A CLI option given as 0 or an empty string reaches its config's check (it was taken for 'unset'); thread counts
    are bounded by the CPUs this process may use, in every config that has them."""
    import os

    from emoscope.errors import validated
    from emoscope.models import ModelConfig
    from emoscope.stages.audit import AuditConfig
    from emoscope.stages.sensitivity import SensitivityConfig

    n = len(os.sched_getaffinity(0))
    base = ("evaluate", "--model", tiny_dir, "--dataset", toy_data)
    _one_line_error(cli(*base, "--threads", 0), "model.threads")
    _one_line_error(cli(*base, "--backend", "llama.cpp", "--threads", 0), "model.threads")
    _one_line_error(cli(*base, "--backend", "llama.cpp", "--threads", 10000), f"more than the {n} CPU")
    _one_line_error(cli(*base, "--dtype", ""), "model.dtype")
    _one_line_error(cli(*base, "--device", ""), "model.device")
    _one_line_error(cli(*base, "--labels", ""), "label")
    _one_line_error(cli("train-saes", "--model", tiny_dir, "--layers", ""), "--layers")
    for cls, data, key in ((ModelConfig, {"backend": "llama.cpp", "threads": n + 1}, "model.threads"),
                           (AuditConfig, {"candidates": [{"name": "a", "runtime": "llama.cpp", "threads": 10000}]},
                            "threads"),
                           (SensitivityConfig, {"threads": 10000}, "sensitivity.threads")):
        with pytest.raises(es.EmoscopeError, match=key):
            validated(cls, data, key.split(".")[0] + "." if "." in key else "")
    assert validated(ModelConfig, {"backend": "llama.cpp", "threads": n}, "model.").threads == n
    for name in ("", " ", "a/b"):  # candidate names name files
        with pytest.raises(es.EmoscopeError, match=r"audit\.candidates\.0\.name: .* is not a name"):
            validated(AuditConfig, {"candidates": [{"name": name, "precision": "int4"}]}, "audit.")
    _one_line_error(cli(*base, "--model", ""), "model.name")


@pytest.mark.parametrize("data", [
    {"candidates": [{"name": "x", "runtime": "llama.cpp", "threads": 0}]},
    {"candidates": [{"name": "x", "kv_cache": "zz"}]},
    {"candidates": [{"name": "x", "precision": "llama.cpp:Q9"}]},
    {"candidates": [{"name": "x", "text": "zz"}]},
    {"thresholds": {"max_flip_rate": 2}},
])
def test_messages_name_the_users_key_not_pydantics_internals(data):
    from emoscope.errors import validated
    from emoscope.stages.audit import AuditConfig

    with pytest.raises(es.EmoscopeError) as e:
        validated(AuditConfig, data, "audit.")
    msg = str(e.value)
    assert msg.startswith("audit.") and not any(s in msg for s in ("function-", "Value error", "[<", "lambda")), msg


def test_an_impossible_gguf_header_is_not_a_valid_gguf(tmp_path):
    """A header claiming more tensors or keys than the file can hold, another version, or a file ending inside the
    header: 'not a valid GGUF' in one line, before any parser reads it (it gave a utf-8 decode error)."""
    import struct

    from emoscope.models import check_reference, load_model

    cases = {"absurd.gguf": b"GGUF" + struct.pack("<IQQ", 3, 2**40, 5) + b"\0" * 64,
             "version.gguf": b"GGUF" + struct.pack("<IQQ", 99, 1, 1) + b"\0" * 64,
             "short.gguf": b"GGUF\x03\0\0\0\x01"}
    for name, blob in cases.items():
        f = tmp_path / name
        f.write_bytes(blob)
        for call in (lambda: check_reference(str(f)), lambda: load_model(str(f)),
                     lambda: load_model(str(f), backend="llama.cpp")):
            with pytest.raises(es.EmoscopeError, match="not a valid GGUF"):
                call()
    _one_line_error(cli("evaluate", "--model", tmp_path / "absurd.gguf"), "claims 1,099,511,627,776 tensors")
