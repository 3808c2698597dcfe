"""SAELens interoperability and on-disk checks."""

import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.sae import SAE, SAEConfig
from emoscope.sae.io import check_against, load, save


def _random_sae(arch, seed=0, d_in=32, d_sae=96):
    sae = SAE.init(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=8, hook_name="blocks.2.hook_resid_post",
                             model_name="tiny-llama"), seed=seed, b_dec=torch.randn(d_in) * 0.1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0, 0.2)
    return sae


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_roundtrip_and_saelens_loads_ours(arch, tmp_path):
    sae = _random_sae(arch)
    save(sae, tmp_path / "s")
    again = load(tmp_path / "s")
    x = torch.randn(50, 32)
    torch.testing.assert_close(again(x).recon, sae(x).recon)
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_we_load_saelens_written(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata
    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig}[arch]
    sae_cls = {"standard": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE, "jumprelu": sae_lens.JumpReLUSAE}[arch]
    kw = {"k": 8} if arch == "topk" else {}
    cfg = cfg_cls(d_in=32, d_sae=96, **kw, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
    theirs = sae_cls(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        if arch == "jumprelu":
            theirs.threshold.uniform_(0, 0.2)
    theirs.save_model(tmp_path / "t")
    ours = load(tmp_path / "t")
    x = torch.randn(40, 32)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x).recon, theirs.decode(theirs.encode(x)), atol=1e-5, rtol=1e-5)
    assert ours.cfg.hook_name == "blocks.1.hook_resid_post"


def test_bad_sae_files(tmp_path, tiny_llama):
    sae = _random_sae("topk")
    save(sae, tmp_path / "s")
    check_against(sae, tiny_llama)  # d_in 32, layer 2 of 4: fine
    with pytest.raises(EmoscopeError, match="d_model=32"):
        check_against(_random_sae("topk", d_in=16), tiny_llama)
    bad_hook = _random_sae("topk")
    bad_hook.cfg.hook_name = "blocks.9.hook_resid_post"
    with pytest.raises(EmoscopeError, match="out of range"):
        check_against(bad_hook, tiny_llama)
    with pytest.raises(EmoscopeError, match="trained on blocks.2"):
        check_against(sae, tiny_llama, "blocks.3.hook_resid_post")
    w = tmp_path / "s" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(EmoscopeError, match="unreadable or truncated"):
        load(tmp_path / "s")
    with pytest.raises(EmoscopeError, match="not an SAE folder"):
        load(tmp_path / "nothing")


def test_pretrained_release_goes_through_saelens(tmp_path, tiny_llama, monkeypatch):
    """A SAELens release id is loaded with SAELens's own from_pretrained (stubbed here: no network)."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata
    from emoscope.hooks import HookPoint
    from emoscope.sae.pretrained import load_saes

    def fake_from_pretrained(release, sae_id, device="cpu"):
        assert (release, sae_id) == ("some-release", "layer_2/width_96")
        s = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=32, d_sae=96,
                                                            metadata=SAEMetadata(hook_name="blocks.2.hook_resid_post")))
        with torch.no_grad():
            s.W_enc.normal_()
        return s

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(fake_from_pretrained))
    saes = load_saes("some-release", tiny_llama, hooks=[HookPoint(2).name],
                     ids={"blocks.2.hook_resid_post": "layer_2/width_96"})
    assert saes["blocks.2.hook_resid_post"].cfg.d_sae == 96
    with pytest.raises(EmoscopeError, match="give pretrained_ids for blocks.3"):
        load_saes("some-release", tiny_llama, hooks=[HookPoint(3).name], ids={"blocks.2.hook_resid_post": "x"})
    with pytest.raises(EmoscopeError, match="folder not found"):
        load_saes(str(tmp_path / "none"), tiny_llama, hooks=[HookPoint(2).name])
