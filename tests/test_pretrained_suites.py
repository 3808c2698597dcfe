"""Pretrained SAE suites as input: sae_id templates and `all` resolved from SAELens's (offline) release
directory, Neuronpedia ids kept, input normalisation honoured, SAEs placed on the chosen device."""

import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.hooks import HookPoint
from emoscope.sae.io import load, save
from emoscope.sae.pretrained import hook_of, load_saes, release_ids

sae_lens = pytest.importorskip("sae_lens")


def test_template_and_all_resolve_against_the_release_directory():
    hooks = [HookPoint(layer).name for layer in range(26)]
    ids = release_ids("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_16k/canonical", hooks)
    assert ids["blocks.25.hook_resid_post"] == "layer_25/width_16k/canonical" and len(ids) == 26
    with pytest.raises(EmoscopeError, match=r"2 SAEs for blocks.0.hook_resid_post .*'layer_\{layer\}/width_16k/"):
        release_ids("gemma-scope-2b-pt-res-canonical", "all", None)
    with pytest.raises(EmoscopeError, match="has no SAE layer_3/width_3k"):
        release_ids("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_3k/canonical", [HookPoint(3).name])
    with pytest.raises(EmoscopeError, match="template with \\{layer\\}"):
        release_ids("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/canonical", hooks)
    llama = release_ids("llama_scope_lxr_8x", "all", None)
    assert len(llama) == 32 and llama["blocks.31.hook_resid_post"] == "l31r_8x"
    assert hook_of("llama_scope_lxm_8x", "l4m_8x") == "blocks.4.hook_mlp_out"
    assert hook_of("gpt2-small-res-jb", "blocks.5.hook_resid_pre") == "blocks.4.hook_resid_post"
    assert hook_of("gpt2-small-res-jb", "blocks.0.hook_resid_pre") is None  # the embedding: no emoscope hook
    assert hook_of("gemma-scope-2b-pt-att-canonical", "layer_3/width_16k/canonical") is None  # hook_z


def _jumprelu(d_in=32, d_sae=64, hook="blocks.1.hook_resid_post", **kw):
    from sae_lens.saes.sae import SAEMetadata
    s = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook),
                                                       **kw))
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0, 0.3)
        s.threshold.uniform_(0, 0.3)
    return s


def test_release_by_template_keeps_neuronpedia_ids_and_hooks(tiny_llama, monkeypatch):
    asked = []

    def fake_from_pretrained(release, sae_id, device="cpu"):
        asked.append(sae_id)
        return _jumprelu(hook=f"blocks.{sae_id.split('/')[0][6:]}.hook_resid_post")

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(fake_from_pretrained))
    hooks = [HookPoint(layer).name for layer in range(4)]
    saes = load_saes("gemma-scope-2b-pt-res-canonical", tiny_llama, hooks=hooks,
                     ids="layer_{layer}/width_16k/canonical", device="cpu")
    assert asked == [f"layer_{i}/width_16k/canonical" for i in range(4)]
    assert list(saes) == hooks
    extra = saes["blocks.2.hook_resid_post"].cfg.extra
    assert extra["neuronpedia_id"] == "gemma-2-2b/2-gemmascope-res-16k" and extra["sae_id"] == asked[2]
    assert all(s.cfg.architecture == "jumprelu" and s.W_dec.device.type == "cpu" for s in saes.values())


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_input_normalisation_matches_saelens(norm, tmp_path):
    theirs = _jumprelu(normalize_activations=norm)
    theirs.save_model(tmp_path / "t")
    ours = load(tmp_path / "t")
    assert ours.cfg.normalize == norm
    x = torch.randn(20, 32) * 5 + 1
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(x).recon, theirs(x), atol=1e-4, rtol=1e-4)
    save(ours, tmp_path / "again")
    torch.testing.assert_close(load(tmp_path / "again")(x).recon, ours(x).recon)


def test_edit_delta_is_rescaled_into_the_residual(tmp_path):
    """Setting a feature to f' moves the reconstruction by exactly what apply_edits adds (normalised SAE)."""
    from emoscope.interventions.edits import Edit, apply_edits

    theirs = _jumprelu(normalize_activations="constant_norm_rescale")
    theirs.save_model(tmp_path / "t")
    sae = load(tmp_path / "t")
    x = torch.randn(1, 3, 32) * 4
    feats = sae.encode(x[0, 1])
    j = int(feats.argmax())

    class Block(torch.nn.Module):
        def forward(self, t):
            return t

    class View:
        blocks = torch.nn.ModuleList([Block(), Block()])

        def check_layer(self, layer):
            return layer

    with apply_edits(View(), {1: sae}, [Edit(layer=1, feature=j, mode="clamp", value=0.0)], torch.tensor([1])):
        out = View.blocks[1](x)
    edited = feats.clone()
    edited[j] = 0
    _, scale = sae.norm_stats(x[0, 1])
    want = (sae.decode(edited) - sae.decode(feats)) * scale
    torch.testing.assert_close(out[0, 1] - x[0, 1], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 0], x[0, 0])


def test_sae_device_setting(tiny_llama, tmp_path):
    from emoscope.stages.saes import SAEStageConfig

    assert "device" not in SAEStageConfig(device="cpu").model_dump()  # placement is not part of the hash
    if not torch.cuda.is_available():  # the setting reaches the stage through a config object too
        from emoscope.stages.saes import train_saes
        with pytest.raises(EmoscopeError, match="CUDA is not available"):
            train_saes(tiny_llama, SAEStageConfig(device="cuda"), layers=[1])
    with pytest.raises(EmoscopeError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        load_saes({"blocks.1.hook_resid_post": load_saes_source(tmp_path)}, tiny_llama, device="cuda")


def load_saes_source(tmp_path):
    theirs = _jumprelu()
    theirs.save_model(tmp_path / "src")
    return load(tmp_path / "src")
