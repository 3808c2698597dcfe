"""Causal machinery on a tiny model: the error-term splice is the identity, attribution matches a
finite difference, and a planted causal feature is found while random features are not."""

import numpy as np
import torch

import pytest

from emoscope.interventions.answers import AnswerBatch, answer_batches, answer_logits, prompt_batches
from emoscope.interventions.edits import Edit, apply_edits, set_features
from emoscope.interventions.effects import ablate, ablate_each, attribution, margin
from emoscope.sae import SAE, SAEConfig
from emoscope.hooks import pad_batch
from tiny import CORPUS, tiny_model


def _setup(seed=0, arch="llama", prefix="", **kw):
    view = tiny_model(arch, seed=seed, **kw)
    tok = view.tokenizer
    prompts = [tok(prefix + t + " Emotion:").input_ids for t in CORPUS[:6]]
    tokens = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in ["joy", "fear", "anger"]]
    saes = {}
    for layer in (1, 2):
        saes[layer] = SAE.init(SAEConfig(d_in=32, d_sae=64, k=8, hook_name=f"blocks.{layer}.hook_resid_post"),
                               seed=layer)
        with torch.no_grad():
            saes[layer].b_enc.fill_(0.1)
    gold = np.array([0, 1, 2, 0, 1, 2])
    return view, saes, prompts, tokens, gold


def _clean_margin(view, prompts, gold, tokens):
    ids, mask = pad_batch(prompts, "cpu")
    last = torch.tensor([len(p) - 1 for p in prompts])
    with torch.no_grad():
        logits, _ = answer_logits(view, ids, mask, last, tokens)
    return margin(logits, torch.as_tensor(gold)).numpy()


def test_splice_with_no_change_is_identity():
    """Edits of real, active features that change nothing (scale 1, add 0) leave the logits bit-identical;
    the same features set to zero change them (so the identity is not vacuous)."""
    view, saes, prompts, tokens, gold = _setup()
    clean = _clean_margin(view, prompts, gold, tokens)
    ids, mask = pad_batch(prompts, "cpu")
    last = torch.tensor([len(p) - 1 for p in prompts])
    with torch.no_grad():
        ref = view.model(input_ids=ids, attention_mask=mask).logits
        _, res = answer_logits(view, ids, mask, last, tokens, [1, 2])
        active = {layer: np.flatnonzero((saes[layer].encode(res[layer][torch.arange(len(ids)), last]) > 0).any(0))[:4]
                  for layer in (1, 2)}
        assert all(len(f) == 4 for f in active.values())
        noop = [Edit(layer=layer, feature=int(f), mode=m, value=v) for layer, fs in active.items() for f in fs
                for m, v in (("scale", 1.0), ("add", 0.0))]
        with apply_edits(view, saes, noop, last):
            same = view.model(input_ids=ids, attention_mask=mask).logits
        with set_features(view, saes, {layer: list(fs) for layer, fs in active.items()}, last):
            changed = view.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(same, ref)
    assert not torch.allclose(changed, ref)
    np.testing.assert_allclose(ablate(view, saes, prompts, gold, tokens, {1: [], 2: []}), clean, atol=1e-6)


def test_attribution_matches_finite_difference():
    view, saes, prompts, tokens, gold = _setup()
    attr, clean = attribution(view, saes, prompts, gold, tokens, batch_size=4)
    np.testing.assert_allclose(clean, _clean_margin(view, prompts, gold, tokens), atol=1e-5)
    # scale one active feature by (1 - eps): exact change / eps ~ gradient . (-f) = attribution
    eps = 1e-3
    layer = 2
    f_all = attr[layer]
    b, j = np.unravel_index(np.argmax(np.abs(f_all)), f_all.shape)
    ids, mask = pad_batch([prompts[b]], "cpu")
    last = torch.tensor([len(prompts[b]) - 1])
    with torch.no_grad():
        _, res = answer_logits(view, ids, mask, last, tokens, [layer])
        f = saes[layer].encode(res[layer][:, -1])
        base = f.clone()
        base[0, j] *= (1 - eps)
        m = ablate(view, saes, [prompts[b]], gold[b:b + 1], tokens, {layer: [int(j)]}, baseline={layer: base})
    fd = (m[0] - clean[b]) / eps
    assert abs(fd - f_all[b, j]) < 1e-2 * max(1.0, abs(fd)), (fd, f_all[b, j])


def test_planted_causal_feature_found_and_random_control_not():
    """Plant a feature whose decoder direction writes the 'joy' unembedding into the residual:
    ablating it must cut the joy margin; random features must not matter."""
    view, saes, prompts, tokens, gold = _setup(seed=1)
    sae = saes[2]
    with torch.no_grad():
        direction = view.unembed.weight[tokens[0]] - view.unembed.weight[tokens[1:]].mean(0)
        sae.W_dec[7] = direction / direction.norm()
        sae.W_enc[:, 7] = 0.0
        sae.b_enc[7] = 40.0  # always strongly on
    joy = np.zeros(len(prompts), dtype=int)
    attr, clean = attribution(view, saes, prompts, joy, tokens)
    assert np.argmin(attr[2].mean(0)) == 7  # the largest estimated margin loss when set to zero
    planted = ablate(view, saes, prompts, joy, tokens, {2: [7]})
    rng = np.random.default_rng(0)
    rand = [ablate(view, saes, prompts, joy, tokens, {2: [int(rng.integers(8, 64))]}) for _ in range(5)]
    drop = (clean - planted).mean()
    assert drop > 0.3 and all(abs((clean - r).mean()) < 0.1 * drop for r in rand), (drop,
                                                                                    [(clean - r).mean() for r in rand])


def test_margin_kinds():
    """best_other is positive exactly when the calibrated argmax is gold; all_others is the log-odds,
    which is negative for a winning gold label with p < 1/2."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, generator=g) * 2
    prior = torch.log_softmax(torch.randn(6, generator=g), -1)
    gold = torch.randint(0, 6, (200,), generator=g)
    best = margin(logits, gold, prior, "best_other")
    cal = torch.log_softmax(torch.log_softmax(logits, -1) - prior, -1)
    assert torch.equal(best > 0, cal.argmax(-1) == gold)
    p = cal.exp().gather(-1, gold[:, None])[:, 0]
    torch.testing.assert_close(margin(logits, gold, prior, "all_others"), torch.log(p / (1 - p)), atol=1e-4, rtol=1e-4)
    assert ((best > 0) & (margin(logits, gold, prior, "all_others") < 0)).any()
    try:
        margin(logits, gold, prior, "nope")
    except ValueError as e:
        assert "best_other" in str(e)
    else:
        raise AssertionError("unknown margin kind accepted")


@pytest.mark.parametrize("arch,window,prefix", [("llama", 0, ""), ("qwen2", 0, ""), ("gpt2", 0, ""), ("gemma3", 64, ""),
                                                ("gemma3", 8, ""), ("llama", 0, "Name the feeling in this text: "),
                                                ("gemma3", 64, "Name the feeling in this text: ")])
def test_cached_answer_passes_equal_whole_prompt_passes(arch, window, prefix):
    """Running only the answer token on a cached, left-padded prefix gives the same margins,
    ablation effects and attributions as whole right-padded prompts (prompts of unequal length;
    past a sliding window the whole prompts run; a shared instruction runs once for all prompts)."""
    kw = {"sliding_window": window} if window else {}
    view, saes, prompts, tokens, gold = _setup(arch=arch, prefix=prefix, **kw)
    if prefix:
        from emoscope.task.score import _common_prefix
        assert _common_prefix(prompts) >= 5
    whole = [AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(view, prompts, 4)]
    cached = answer_batches(view, prompts, 4)
    assert all(b.cache is None for b in cached) == (window == 8)
    feats = {1: [0, 3, 5], 2: [1, 2]}
    for fs in ({}, feats):
        np.testing.assert_allclose(ablate(view, saes, cached, gold, tokens, fs),
                                   ablate(view, saes, whole, gold, tokens, fs),
                                   atol=1e-5)
    a_c, m_c = attribution(view, saes, cached, gold, tokens)
    a_w, m_w = attribution(view, saes, whole, gold, tokens)
    np.testing.assert_allclose(m_c, m_w, atol=1e-5)
    for layer in a_c:
        np.testing.assert_allclose(a_c[layer], a_w[layer], atol=1e-5)
    assert ablate(view, saes, cached, gold, tokens, feats).tolist() == ablate(view, saes, cached, gold, tokens,
                                                                              feats).tolist()


@pytest.mark.parametrize("arch,window,prefix", [("llama", 0, ""), ("gpt2", 0, ""), ("gemma3", 64, ""),
                                                ("gemma3", 8, ""), ("llama", 0, "Name the feeling in this text: ")])
def test_many_ablations_in_one_pass_equal_one_pass_each(arch, window, prefix):
    """ablate_each runs several feature sets per pass (copies of each answer token that attend to their
    prompt and themselves only; rows repeated where prompts run whole) and gives each set's ablate() margins:
    single features, several layers, the empty set, a mean baseline, both margins, groups cut by `pass_tokens`."""
    kw = {"sliding_window": window} if window else {}
    view, saes, prompts, tokens, gold = _setup(arch=arch, prefix=prefix, **kw)
    batches = answer_batches(view, prompts, 4)
    assert all(b.cache is None for b in batches) == (window == 8)
    sets = [{1: [f]} for f in range(0, 64, 7)] + [{}, {1: [0, 3, 5], 2: [1, 2]}, {2: [9]}]
    base = {layer: torch.rand(1, 64, generator=torch.Generator().manual_seed(layer)) for layer in saes}
    for kind, baseline, pass_tokens in (("best_other", None, 10_000), ("all_others", base, 9)):
        one = np.stack([ablate(view, saes, batches, gold, tokens, s, baseline=baseline, kind=kind) for s in sets])
        each = ablate_each(view, saes, batches, gold, tokens, sets, baseline=baseline, kind=kind,
                           pass_tokens=pass_tokens)
        assert each.shape == (len(sets), len(prompts))
        np.testing.assert_allclose(each, one, atol=1e-5)
        copied = [b.copies(3, masked=False) for b in batches]  # the path for flash attention: rows repeated
        with torch.no_grad():
            g3 = torch.as_tensor(gold).repeat_interleave(3)
            rep = np.concatenate([margin(c.logits(view, tokens, sites=st)[0], g3[c.start * 3:c.start * 3 + len(c.ids)],
                                         kind=kind).numpy() for c, st in copied])
        np.testing.assert_allclose(rep.reshape(-1, 3), np.repeat(one[len(sets) - 3][:, None], 3, 1), atol=1e-5)
        assert np.abs(one - one[len(sets) - 3]).max() > 1e-2  # the sets do change the margins
    assert ablate_each(view, saes, batches, gold, tokens, []).shape == (0, len(prompts))


def test_exact_screen_ranks_by_each_features_own_ablation():
    """screen: exact gives every feature its exact margin drop (zero where it equals the baseline on every
    example), and the phase validates the true top candidates, which the attribution screen need not pick."""
    from types import SimpleNamespace
    from emoscope.stages.trace import TraceConfig, _exact_screen, _Tracer, _validate_phase
    view, saes, prompts, tokens, gold = _setup(seed=2)
    batches = answer_batches(view, prompts, 4)
    attr, clean = attribution(view, saes, batches, gold, tokens)
    cfg = TraceConfig(screen="exact", candidates=3, n_random=2, n_boot=50)
    tr = _Tracer(SimpleNamespace(model=view), saes, cfg, {"tokens": tokens, "log_prior": None, "baseline": None,
                                                          "kind": "best_other"},
                 np.random.default_rng(0), np.random.default_rng(1))
    rank = _exact_screen(tr, batches, gold, clean, attr)
    for layer in saes:
        dead = np.abs(attr[layer]).sum(0) == 0
        assert 0 < dead.sum() < 64 and (rank[layer][dead] == 0).all()
        for f in list(np.flatnonzero(~dead)[:6]) + list(np.flatnonzero(dead)[:2]):
            drop = (clean - ablate(view, saes, batches, gold, tokens, {layer: [int(f)]})).mean()
            assert abs(rank[layer][f] - drop) < 1e-5
    est = {layer: -a.mean(0) for layer, a in attr.items()}
    out = _validate_phase(tr, batches, gold, clean, attr, est, [1, 2], rank)
    top = sorted(((rank[la][f], la, f) for la in (1, 2) for f in range(64)), reverse=True)[:3]
    assert {(r["layer"], r["feature"]) for r in out["features"]} == {(la, f) for _, la, f in top}
    assert all(r["attribution"] == est[r["layer"]][r["feature"]] for r in out["features"])
    assert "screen_check" not in out and out["top_attribution"] == max(est[1].max(), est[2].max())


def test_screen_check_flags_a_screen_that_misranks():
    """Planted effects: a screen whose estimates follow the exact effects passes; a reversed one is flagged,
    and the strong feature it missed is reported."""

    from emoscope.stages.trace import TraceConfig, _screen_check

    effects = {(1, f): float(f) for f in range(20)}  # feature f's exact effect is f

    class Fake:
        cfg = TraceConfig(screen_check=10)
        check_rng = np.random.default_rng(0)

        def ablate_each(self, prompts, gold, sets):
            return np.stack([np.full(4, 100.0) - effects[(layer, fs[0])] for s in sets for layer, fs in s.items()])

    clean = np.full(4, 100.0)
    for sign, flagged in ((1.0, False), (-1.0, True)):
        est = {1: sign * (np.arange(20, dtype=float) + 1)}
        attr = {1: -np.tile(est[1], (4, 1))}  # nonzero attribution: every feature is live
        top = np.argsort(-est[1])[:3]
        exact = [{"layer": 1, "feature": int(f), "attribution": float(est[1][f]),
                  "effect": {"value": effects[(1, int(f))]}} for f in top]
        c = _screen_check(Fake(), None, None, clean, attr, est, [1], exact)
        assert c["flagged"] == flagged and c["sampled"] == 10 and c["pool"] == 20
        if flagged:
            assert c["spearman"]["value"] < 0 and c["top_recall"]["value"] == 0 and c["beats_best"]
        else:
            assert c["spearman"]["value"] == 1.0 and c["top_recall"]["value"] == 1.0 and not c["beats_best"]


def test_label_scores_read_the_answer_residuals_of_the_same_forwards():
    """score_ids(resid_layers=...) gives, beside unchanged scores, each prompt's answer-position residual,
    equal to the answer passes' (prompts of unequal length sharing an instruction, sorted into batches)."""
    from emoscope.interventions.answers import answer_resid
    from emoscope.task.score import score_ids

    view, _, prompts, tokens, _ = _setup(prefix="Name the feeling in this text: ")
    labels = [[t] for t in tokens] + [[tokens[0], tokens[1]]]
    scores, res = score_ids(view, prompts, labels, batch_size=4, resid_layers=[1, 3])
    np.testing.assert_array_equal(scores, score_ids(view, prompts, labels, batch_size=4))
    ref = {layer: torch.cat([r[layer] for r in answer_resid(view, prompts, [1, 3], tokens)]).numpy()
           for layer in (1, 3)}
    for layer in (1, 3):
        np.testing.assert_allclose(res[layer], ref[layer], atol=1e-5)


def test_answer_residuals_from_prebuilt_batches_leave_their_caches_usable():
    from emoscope.interventions.answers import answer_resid

    view, _, prompts, tokens, _ = _setup(prefix="Name the feeling in this text: ")
    fresh = [r[2] for r in answer_resid(view, prompts, [2], tokens)]
    batches = answer_batches(view, prompts, 4)
    lengths = [b.cache.get_seq_length() for b in batches]
    for _ in range(2):  # a second read gives the same: the first did not consume the caches
        reused = [r[2] for r in answer_resid(view, batches, [2], tokens)]
        torch.testing.assert_close(torch.cat(reused), torch.cat(fresh), atol=1e-5, rtol=0)
        assert [b.cache.get_seq_length() for b in batches] == lengths


def test_an_sae_off_the_residual_stream_is_refused_by_the_stages_that_edit_it(tiny_llama, toy_data):
    """trace, steer and audit read and edit features at blocks.L.hook_resid_post: an mlp_out SAE would be read and
    edited on the residual stream, silently wrong, so it is refused in one line naming the hook."""
    import emoscope as es
    from emoscope.sae import SAE, SAEConfig

    task = es.Task(tiny_llama, dataset=str(toy_data), per_class=2)
    ev = es.evaluate(task)
    sae = SAE(SAEConfig(d_in=tiny_llama.d_model, d_sae=64, k=4, hook_name="blocks.1.hook_mlp_out"))
    saes = {"blocks.1.hook_resid_post": sae, "blocks.1.hook_mlp_out": sae}
    calls = {"trace": lambda: es.trace(task, saes, ev, None), "steer": lambda: es.steer(task, saes, ev, None),
             "audit": lambda: es.audit(task, saes, ev)}
    for stage, call in calls.items():
        with pytest.raises(es.EmoscopeError, match=rf"^{stage} reads and edits SAE features on the residual stream "
                                                   r".*the SAE at blocks\.1\.hook_mlp_out is on another hook"):
            call()
