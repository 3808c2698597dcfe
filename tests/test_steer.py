"""Steering: zero strength changes nothing bit for bit; a planted feature moves the prediction the
expected way; files from another model or SAE, and non-finite strengths, are refused."""

import pytest
import torch

from emoscope.interventions.answers import answer_logits
from emoscope.interventions.edits import Edit, apply_edits as steer
from emoscope.interventions.steering import check, load_steering, make_steering, save_steering
from emoscope.errors import EmoscopeError
from emoscope.sae import SAE, SAEConfig
from emoscope.hooks import pad_batch
from tiny import CORPUS, tiny_model


def _setup():
    view = tiny_model("llama", seed=2)
    tok = view.tokenizer
    prompts = [tok(t + " Emotion:").input_ids for t in CORPUS[:5]]
    tokens = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in ["joy", "fear", "anger"]]
    sae = SAE.init(SAEConfig(d_in=32, d_sae=48, k=8, hook_name="blocks.2.hook_resid_post"), seed=3)
    with torch.no_grad():
        direction = view.unembed.weight[tokens[0]] - view.unembed.weight[tokens[1:]].mean(0)
        sae.W_dec[5] = direction / direction.norm()
        sae.W_enc[:, 5] = 0
        sae.b_enc[5] = 1.0  # weakly on everywhere
    ids, mask = pad_batch(prompts, "cpu")
    last = torch.tensor([len(p) - 1 for p in prompts])
    return view, {2: sae}, ids, mask, last, tokens


def test_zero_strength_is_bit_for_bit_identity():
    view, saes, ids, mask, last, tokens = _setup()
    with torch.no_grad():
        ref = view.model(input_ids=ids, attention_mask=mask).logits
        for edits in ([Edit(layer=2, feature=5, mode="scale", value=1.0)],
                      [Edit(layer=2, feature=5, mode="add", value=0.0)]):
            for pos in (last, None):
                with steer(view, saes, edits, pos):
                    out = view.model(input_ids=ids, attention_mask=mask).logits
                assert torch.equal(out, ref)


def test_planted_feature_moves_prediction():
    view, saes, ids, mask, last, tokens = _setup()
    with torch.no_grad():
        base, _ = answer_logits(view, ids, mask, last, tokens)
        with steer(view, saes, [Edit(layer=2, feature=5, mode="scale", value=40.0)], last):
            up, _ = answer_logits(view, ids, mask, last, tokens)
        with steer(view, saes, [Edit(layer=2, feature=5, mode="clamp", value=0.0)], last):
            down, _ = answer_logits(view, ids, mask, last, tokens)
    joy = lambda logits: (torch.log_softmax(logits, -1)[:, 0]).mean()
    assert joy(up) > joy(base) > joy(down)
    share = lambda logits: (logits.argmax(1) == 0).float().mean()  # noqa: E731
    assert share(up) > share(base) or bool((base.argmax(1) == 0).all())


def test_steering_file_checks(tmp_path):
    view, saes, *_ = _setup()
    s = make_steering(view, saes, [Edit(layer=2, feature=5, value=3.0)], {"dataset": "toy"})
    save_steering(s, tmp_path / "s.json")
    again = load_steering(tmp_path / "s.json")
    check(again, view, saes)
    other = SAE.init(SAEConfig(d_in=32, d_sae=48, k=8), seed=9)
    with pytest.raises(EmoscopeError, match=r"another SAE at blocks\.2\.hook_resid_post"):
        check(again, view, {2: other})
    again.model_name = "other-model"
    with pytest.raises(EmoscopeError, match="made for model 'other-model'"):
        check(again, view, saes)
    (tmp_path / "bad.json").write_text((tmp_path / "s.json").read_text().replace("3.0", "NaN"))
    with pytest.raises(EmoscopeError, match="invalid steering file"):
        load_steering(tmp_path / "bad.json")
    with pytest.raises(EmoscopeError, match="non-finite"):
        with torch.no_grad(), steer(view, saes, [Edit(layer=2, feature=5, mode="scale", value=1e39)]):
            view.model(input_ids=torch.tensor([[1, 2, 3]]))


def test_classify_python_and_cli(tmp_path, tiny_dir, toy_data):
    import json as _json
    import numpy as np
    from emoscope.interventions.steering import label_probs
    from emoscope.pipeline import RunContext
    from emoscope.config import RunConfig
    from emoscope.pipeline import run
    from test_cli import cli

    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)},
                                    "stages": ["evaluate"],
                                    "evaluate": {"data": {"dataset": str(toy_data), "per_class": 2}}})
    run(cfg, log=lambda s: None)
    task = RunContext.from_run_dir(tmp_path / "run").task  # the run's task, rebuilt from its evaluate result
    view = task.model
    p = label_probs(task, ["I feel happy", "so scared"])
    assert p.shape == (2, 6) and np.allclose(p.sum(1), 1)
    # pushing toward joy (a feature writing joy's unembedding, added at the answer position) raises
    # p(joy) against the unsteered prior; steering the content-free inputs too would absorb the push
    j, last = task.classes.index("joy"), view.n_layers - 1
    first = [i[0] for i in task.builder.label_ids()]
    sae = SAE.init(SAEConfig(d_in=view.d_model, d_sae=16, k=4, hook_name=f"blocks.{last}.hook_resid_post"), seed=0)
    with torch.no_grad():
        w = view.unembed.weight
        sae.W_dec[3] = (w[first[j]] - w[first].mean(0)) / (w[first[j]] - w[first].mean(0)).norm()
    texts, push = ["I feel happy", "so scared", "what a day"], [Edit(layer=last, feature=3, mode="add", value=20.0)]
    base = label_probs(task, texts)
    assert np.allclose(label_probs(task, texts, {last: sae}, [], steer_prior=False), base)
    assert label_probs(task, texts, {last: sae}, push, steer_prior=False)[:, j].mean() > base[:, j].mean() + 0.05
    r = cli("classify", "--run", tmp_path / "run", "I feel happy", "so scared", "--json")
    assert r.returncode == 0, r.stderr
    out = _json.loads(r.stdout)  # --json: stdout carries only JSON
    assert abs(out[0]["joy"] - p[0, task.classes.index("joy")]) < 1e-3


def test_probe_directions_exclude_round_off():
    """The class-mean deviations from the overall mean sum to zero (weighted by class size), so K classes
    span K - 1 directions; a float32 round-off remnant (found amplified by the steering) must not count."""
    import numpy as np

    from emoscope.interventions.probe import ProbeSteer

    rng = np.random.default_rng(0)
    K, per, d = 6, 12, 640
    centers = rng.normal(size=(K, d)) * 3
    y = np.repeat(np.arange(K), per)
    resid = (centers[y] + rng.normal(size=(K * per, d))).astype(np.float32) * 40  # residual-stream scale
    probe = ProbeSteer(3, resid, y)
    assert probe.U.shape == (d, K - 1)
    unbalanced = np.concatenate([np.flatnonzero(y != 0), np.flatnonzero(y == 0)[:5]])
    assert ProbeSteer(3, resid[unbalanced], y[unbalanced]).U.shape == (d, K - 1)


def test_a_steering_file_of_format_1_is_read_as_the_same_steering(tmp_path):
    """Files written before hook names (no `format`, edits keyed by `layer`) are read as resid_post edits: the same
    checks pass and the same logits come out; a file is written as format 2 with hook names; a newer format is
    refused in one line."""
    import json

    view, saes, ids, mask, last, tokens = _setup()
    new = make_steering(view, saes, [Edit(layer=2, feature=5, mode="scale", value=3.0)], {"dataset": "toy"})
    save_steering(new, tmp_path / "new.json")
    written = json.loads((tmp_path / "new.json").read_text())
    assert written["format"] == 2 and written["edits"][0]["hook"] == "blocks.2.hook_resid_post"
    assert "layer" not in written["edits"][0]
    old = {k: v for k, v in written.items() if k != "format"}  # as emoscope 0.2 wrote it
    old["edits"] = [{"layer": 2, "feature": 5, "mode": "scale", "value": 3.0}]
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = load_steering(tmp_path / "old.json")
    assert read.edits == new.edits and read.edits[0].layer == 2
    check(read, view, saes)
    with torch.no_grad():
        with steer(view, saes, read.edits, last):
            a, _ = answer_logits(view, ids, mask, last, tokens)
        with steer(view, saes, new.edits, last):
            b, _ = answer_logits(view, ids, mask, last, tokens)
    assert torch.equal(a, b)
    (tmp_path / "future.json").write_text(json.dumps({**written, "format": 3}))
    with pytest.raises(EmoscopeError, match=r"format: .*format 3 is not one this emoscope reads.*update emoscope"):
        load_steering(tmp_path / "future.json")


def test_an_mlp_out_sae_is_edited_at_its_own_hook_and_refused_at_another():
    """An edit names its hook: an SAE trained on blocks.1.hook_mlp_out changes the MLP's output there (exactly the
    decoded change, the residual stream only through it), and the same SAE offered for a resid_post edit is refused."""
    from emoscope.hooks import HookPoint, edit_output, record
    from emoscope.interventions.edits import clamp_delta

    view, _, ids, mask, last, tokens = _setup()
    sae = SAE.init(SAEConfig(d_in=32, d_sae=48, k=8, hook_name="blocks.1.hook_mlp_out"), seed=4)
    hp = HookPoint(1, "mlp_out")
    with torch.no_grad():
        with record(view, [hp]) as acts:
            view.model(input_ids=ids, attention_mask=mask)
        x = acts[hp.name][torch.arange(len(last)), last]
        on = int(sae.encode(x)[0].argmax())  # a feature active on the first prompt
        edit = Edit(hook=hp.name, feature=on, mode="clamp", value=0.0)
        with steer(view, {hp.name: sae}, [edit], last):
            got, _ = answer_logits(view, ids, mask, last, tokens)
        delta = clamp_delta(sae, x, torch.arange(len(last)), torch.full((len(last),), on), 0.0)

        def by_hand(t):
            t = t.clone()
            t[torch.arange(len(last)), last] += delta
            return t
        with edit_output(view, hp, by_hand):
            want, _ = answer_logits(view, ids, mask, last, tokens)
        plain, _ = answer_logits(view, ids, mask, last, tokens)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, plain)
    with pytest.raises(EmoscopeError, match=r"edit at blocks\.1\.hook_resid_post would use the SAE trained on "
                                            r"blocks\.1\.hook_mlp_out"):
        with steer(view, {1: sae}, [Edit(layer=1, feature=on, value=2.0)], last):
            pass
    with pytest.raises(EmoscopeError, match=r"no SAE reads blocks\.1\.hook_attn_out"):
        with steer(view, {hp.name: sae}, [Edit(hook="blocks.1.hook_attn_out", feature=on, value=2.0)], last):
            pass
