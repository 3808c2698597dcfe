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
