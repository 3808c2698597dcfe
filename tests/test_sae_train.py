"""TopK SAE: hand-written sparse gradients equal autograd; training recovers a planted dictionary."""

import pytest
import torch

from emoscope.sae.topk_step import topk_grads


def _autograd_loss(x, W_enc, b_enc, W_dec, b_dec, k, dead=None, aux_k=0, aux_coef=1 / 32):
    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    vals, idx = pre.topk(k, -1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    recon = acts @ W_dec + b_dec
    err = recon - x
    loss = err.pow(2).sum(-1).mean()
    if dead is not None and aux_k:
        masked = pre.masked_fill(~dead[None], float("-inf"))
        av, ai = masked.topk(min(aux_k, int(dead.sum())), -1)
        a = torch.zeros_like(pre).scatter(-1, ai, av.relu())
        target = -err.detach()
        denom = (target - target.mean(0)).pow(2).sum(-1).mean()
        loss = loss + aux_coef * (a @ W_dec - target).pow(2).sum(-1).mean() / denom
    return loss


def test_sparse_grads_match_autograd():
    torch.manual_seed(0)
    d, m, B, k = 16, 64, 40, 5
    params = dict(W_enc=torch.randn(d, m) * 0.3, b_enc=torch.randn(m) * 0.1, W_dec=torch.randn(m, d) * 0.3,
                  b_dec=torch.randn(d) * 0.1)
    x = torch.randn(B, d)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::3] = True
    for dd, ak in [(None, 0), (dead, 8)]:
        out, grads = topk_grads(x, *params.values(), k=k, dead=dd, aux_k=ak)
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        loss = _autograd_loss(x, *leaves.values(), k, dd, ak)
        loss.backward()
        for n in params:
            torch.testing.assert_close(grads[n], leaves[n].grad, atol=1e-5, rtol=1e-4, msg=n)
        assert out.l0 <= k


def test_bf16_matmuls_close_to_float32():
    torch.manual_seed(1)
    d, m = 32, 128
    W_enc, b_enc, W_dec, b_dec = torch.randn(d, m), torch.zeros(m), torch.randn(m, d), torch.zeros(d)
    x = torch.randn(64, d)
    o32, g32 = topk_grads(x, W_enc, b_enc, W_dec, b_dec, k=8)
    o16, g16 = topk_grads(x, W_enc, b_enc, W_dec, b_dec, k=8, fast_dtype=torch.bfloat16)
    # bf16 matmuls change the loss by rounding only
    assert abs(float(o16.mse) - float(o32.mse)) / float(o32.mse) < 0.05


def planted(d, n_dict, n, per, seed, noise=0.0):
    """Each sample is a non-negative mix of `per` of `n_dict` planted unit directions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_dict, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_dict, generator=g)[:per] for _ in range(n)])
    x = torch.einsum("nk,nkd->nd", torch.rand(n, per, generator=g) + 0.5, D[idx])
    return D, x + noise * torch.randn(n, d, generator=g)


def test_topk_sae_recovers_planted_dictionary():
    """Synthetic data: each sample is a sparse non-negative mix of 3 of 64 planted unit directions."""
    from emoscope.sae.train import SAETrainConfig, fit

    D, x = planted(32, 64, 60_000, 3, seed=0, noise=0.01)
    cfg = SAETrainConfig(expansion=4, k=3, lr=3e-3, batch_tokens=256, dead_tokens=5000, fast_matmul="float32")
    sae, stats = fit(x, cfg, epochs=3)
    # every planted direction has a decoder row pointing the same way
    cos = (D @ sae.W_dec.detach().T).max(dim=1).values
    assert (cos > 0.95).float().mean() > 0.9, cos.sort().values[:10]
    with torch.no_grad():
        out = sae(x[:2000])
    fvu = (out.recon - x[:2000]).pow(2).sum() / (x[:2000] - x[:2000].mean(0)).pow(2).sum()
    assert fvu < 0.05 and (out.feats > 0).sum(-1).float().mean() <= 3


def test_dense_architectures_train_sparse_codes():
    """ReLU+L1 and JumpReLU+L0: the penalty makes codes sparser than without it, and they still reconstruct."""
    from emoscope.sae.train import SAETrainConfig, fit

    _, x = planted(16, 32, 20_000, 2, seed=1)

    def run(arch, coef):
        cfg = SAETrainConfig(architecture=arch, expansion=4, lr=3e-3, batch_tokens=256, sparsity_coef=coef,
                             bandwidth=0.2)
        sae, _ = fit(x, cfg, epochs=3)
        with torch.no_grad():
            out = sae(x[:2000])
        fvu = float((out.recon - x[:2000]).pow(2).sum() / (x[:2000] - x[:2000].mean(0)).pow(2).sum())
        return fvu, float((out.feats > 0).sum(-1).float().mean()), sae

    for arch, coef in [("relu", 1.0), ("jumprelu", 0.5)]:
        _, l0_free, _ = run(arch, 0.0)
        fvu, l0, sae = run(arch, coef)
        assert fvu < 0.2 and l0 < 0.8 * l0_free, (arch, fvu, l0, l0_free)
        assert sae.cfg.architecture == arch



def _layer(cfg, x):
    from emoscope.hooks import HookPoint
    from emoscope.sae.train import _Layer

    st = _Layer.start(cfg, HookPoint(0), x, "m", torch.device("cpu"))
    return st, x / st.scale


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs():
    from emoscope.sae.train import SAETrainConfig

    torch.manual_seed(0)
    cfg = SAETrainConfig(expansion=4, k=3, lr=1e-3, batch_tokens=128, dead_tokens=1000, fast_matmul="float32")
    D, x = planted(16, 32, 512, 3, seed=1)
    st, xs = _layer(cfg, x)
    st.step(xs[:128], cfg, torch.float32)  # Adam has state now
    dead = torch.arange(0, 64, 4)
    st.since_fired[dead] = 10_000
    W_enc_T, b_enc, W_dec, b_dec = (t.detach().clone() for t in (st.W_enc_T, st.b_enc, st.W_dec, st.b_dec))
    xb = xs[128:256]
    st.resample(xb, cfg, torch.float32)
    assert st.resampled == len(dead) and int(st.since_fired[dead].max()) == 0
    alive = torch.ones(64, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(st.W_dec[alive], W_dec[alive]) and torch.equal(st.W_enc_T[alive], W_enc_T[alive])
    new = st.W_dec[dead].detach()
    torch.testing.assert_close(new.norm(dim=1), torch.ones(len(dead)))
    enc = st.W_enc_T[dead].detach()
    torch.testing.assert_close(enc / enc.norm(dim=1, keepdim=True), new)
    assert float(st.b_enc.detach()[dead].abs().max()) == 0.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert float(st.opt.state[st.W_dec][key][dead].abs().max()) == 0.0
        assert float(st.opt.state[st.W_enc_T][key][dead].abs().max()) == 0.0
    # each new decoder row is the unit residual of one input in the batch, under the old SAE
    pre = (xb - b_dec) @ W_enc_T.T + b_enc
    vals, idx = pre.topk(cfg.k, -1)
    recon = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ W_dec + b_dec
    err = xb - recon
    err = err / err.norm(dim=1, keepdim=True)
    assert float((new @ err.T).max(dim=1).values.min()) > 0.999


def test_resampling_revives_dead_latents_in_training():
    """Half the latents start unable to fire (bias -1e3); resampling brings them back into use."""
    from emoscope.sae.train import SAETrainConfig, _layer_stats

    D, x = planted(32, 256, 40_960, 3, seed=2, noise=0.01)
    stats = {}
    for every in (0, 20):
        cfg = SAETrainConfig(expansion=4, k=3, lr=3e-3, batch_tokens=256, dead_tokens=2560, tokens=len(x),
                             resample_every=every, fast_matmul="float32")
        st, xs = _layer(cfg, x)
        with torch.no_grad():
            st.b_enc[::2] = -1e3
        for i in range(0, len(xs), cfg.batch_tokens):
            st.step(xs[i:i + cfg.batch_tokens], cfg, torch.float32)
        stats[every] = _layer_stats(st, cfg)
    assert stats[0]["dead_frac_train"] > 0.4 and stats[0]["resampled"] == 0
    assert stats[20]["resampled"] > 0 and stats[20]["dead_frac_train"] < stats[0]["dead_frac_train"] / 2
    assert stats[20]["train_fvu_last"] < stats[0]["train_fvu_last"]


def _tiny_cfg(**kw):
    from emoscope.sae.train import SAETrainConfig

    return SAETrainConfig(layers=[0, 1, 2], tokens=3000, expansion=2, k=4, batch_tokens=256, buffer_tokens=1024,
                          seqs_per_forward=4, fast_matmul="float32", **kw)


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(x, y) for h in a for x, y in
                                      zip(a[h].state_dict().values(), b[h].state_dict().values()))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_training_resumes_from_a_checkpoint_bit_for_bit(arch, tiny_llama, shared_data, tmp_path):
    """Interrupted after its second buffer (a checkpoint after each), training resumes where the checkpoint
    left it and ends with the SAEs of an uninterrupted run; layer groups that fit a memory budget, too."""
    from emoscope.sae.train import layer_groups, train_layers

    cfg = _tiny_cfg(architecture=arch, checkpoint_minutes=1e-9)
    clean, clean_stats = train_layers(tiny_llama, cfg, data_dir=shared_data)
    done = []

    def interrupt(n):
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_layers(tiny_llama, cfg, data_dir=shared_data, progress=interrupt, checkpoint_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["train-0-2.pt"]
    resumed_at = []
    saes, stats = train_layers(tiny_llama, cfg, data_dir=shared_data, progress=resumed_at.append,
                               checkpoint_dir=tmp_path)
    assert resumed_at[0] == done[0]  # picked up after the first buffer, the last checkpoint
    assert _same(saes, clean) and stats["layers"] == clean_stats["layers"]
    # a truncated checkpoint is ignored: training starts over, with the same result
    ck = tmp_path / "train-0-2.pt"
    ck.write_bytes(b"\x80\x02junk")
    again, _ = train_layers(tiny_llama, cfg, data_dir=shared_data, checkpoint_dir=tmp_path)
    assert _same(again, clean)
    # another config does not resume from this checkpoint
    other, _ = train_layers(tiny_llama, _tiny_cfg(architecture=arch, seed=1), data_dir=shared_data,
                            checkpoint_dir=tmp_path)
    assert not _same(other, clean)
    # groups: a budget for about one layer's SAE at a time trains them one by one, with the same result
    tight = _tiny_cfg(architecture=arch, max_memory_gb=(16 * 2 * 64 * 32 + 4 * 1024 * 32) * 1.5 / 2**30)
    assert [[h for h in g] for g in layer_groups([0, 1, 2], 32, tight)] == [[0], [1], [2]]
    grouped, gstats = train_layers(tiny_llama, tight, data_dir=shared_data)
    assert _same(grouped, clean) and gstats["groups"] == [[0], [1], [2]]
    assert "max_memory_gb" not in tight.model_dump() and "checkpoint_minutes" not in tight.model_dump()


def test_saes_stage_keeps_trained_saes_before_evaluating(tiny_llama, shared_data, tmp_path, monkeypatch):
    """A saes stage killed during evaluation does not train again: the trained SAEs wait in the checkpoint folder."""
    from emoscope.sae import quality
    from emoscope.stages import saes as stage

    cfg = stage.SAEStageConfig(train=_tiny_cfg().model_dump(), eval_seqs=2, ce=False)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "evaluate_saes", killed)
    with pytest.raises(KeyboardInterrupt):
        stage.compute(tiny_llama, cfg, shared_data, checkpoint_dir=tmp_path)
    assert (tmp_path / "trained" / "stats.json").is_file()
    monkeypatch.setattr(stage, "evaluate_saes", quality.evaluate_saes)
    monkeypatch.setattr(stage, "train_layers", killed)  # must not train again
    res = stage.compute(tiny_llama, cfg, shared_data, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    fresh = stage.compute(tiny_llama, cfg, shared_data)
    assert res.data == fresh.data and _same(res.saes, fresh.saes)


def test_auto_matmul_dtype_follows_the_cpus_measured_bf16_speed():
    from emoscope.sae.train import fast_bf16_cpu
    intel = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert not fast_bf16_cpu(intel)  # bf16 trained slower on such a Xeon
    assert fast_bf16_cpu(intel.replace("avx512_bf16", "avx512_bf16 amx_bf16 amx_tile"))
    assert fast_bf16_cpu(amd)  # and 1.7x faster on an AMD EPYC with AVX512-BF16
    assert not fast_bf16_cpu(amd.replace(" avx512f avx512_bf16", ""))  # AVX2 only
    assert not fast_bf16_cpu("")


def test_harvest_dtype_rule_and_autocast_forwards(tiny_llama, monkeypatch):
    """auto autocasts the harvest forwards to bf16 only where bf16 is fast and the model runs in float32; the
    recorded activations stay float32, near the float32 forward's but not equal to them (the cast happened)."""
    from emoscope.hooks import HookPoint
    from emoscope.sae import train

    monkeypatch.setattr(train, "fast_bf16_cpu", lambda info=None: True)
    assert train.harvest_dtype("auto", tiny_llama) == torch.bfloat16
    assert train.harvest_dtype("model", tiny_llama) == torch.float32
    monkeypatch.setattr(train, "fast_bf16_cpu", lambda info=None: False)
    assert train.harvest_dtype("auto", tiny_llama) == torch.float32
    assert train.harvest_dtype("bfloat16", tiny_llama) == torch.bfloat16
    seqs = [tiny_llama.tokenizer(t).input_ids for t in ("I am so happy today", "What a gross and awful smell")]
    hooks = [HookPoint(1), HookPoint(3)]
    ref, cast = train._harvest(tiny_llama, hooks, seqs), train._harvest(tiny_llama, hooks, seqs, torch.bfloat16)
    for h in hooks:
        a, b = ref[h.name], cast[h.name]
        assert b.dtype == torch.float32 and a.shape == b.shape and not torch.equal(a, b)
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_layer_groups_are_sized_from_free_memory_by_default(monkeypatch):
    """Unset max_memory_gb: groups fit 80% of what the machine has free, after the trained SAEs of every layer;
    a roomy machine trains all layers at once, a tight one layer by layer, and never zero layers a group."""
    import psutil
    from collections import namedtuple

    from emoscope.sae.train import SAETrainConfig, _layer_bytes, layer_groups, memory_budget

    cfg = SAETrainConfig()
    d, hooks = 1536, list(range(28))
    per_layer, kept = _layer_bytes(d, cfg), 28 * 4 * (2 * 8 * d * d + 8 * d + d)
    mem = namedtuple("mem", "available")

    def free(gb):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(gb * 2**30))

    free(1000)
    assert layer_groups(hooks, d, cfg) == [hooks]
    free((kept + 2**30) / 2**30 + 5 * per_layer / 0.8 / 2**30 + 0.01)  # room for five layers at a time
    assert memory_budget(28, d, cfg) // per_layer == 5
    assert [len(g) for g in layer_groups(hooks, d, cfg)] == [5, 5, 5, 5, 5, 3]
    free(0.5)
    assert [len(g) for g in layer_groups(hooks, d, cfg)] == [1] * 28
    assert layer_groups(hooks, d, cfg.model_copy(update={"max_memory_gb": 1000})) == [hooks]  # a set budget wins
