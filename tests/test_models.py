"""The uniform model view on several architectures, and loading by path."""

import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.models import load_model, resolve_dtype
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_view_handles(arch):
    v = tiny_model(arch)
    assert v.n_layers == 4 and v.d_model == 32
    ids = torch.tensor([v.tokenizer("I am so happy").input_ids])
    out = v.model(input_ids=ids, output_hidden_states=True)
    # the last hidden state (before the final norm) read through the view gives the model's logits
    pre_norm = {}
    h = v.final_norm.register_forward_hook(lambda m, i, o: pre_norm.setdefault("x", i[0]))
    v.model(input_ids=ids)
    h.remove()
    torch.testing.assert_close(v.logits_from_resid(pre_norm["x"]), out.logits, atol=1e-5, rtol=1e-5)
    assert v.check_layer(3) == 3
    with pytest.raises(EmoscopeError, match="out of range"):
        v.check_layer(4)


def test_load_local_dir_and_bad_names(tiny_dir):
    v = load_model(str(tiny_dir), device="cpu", dtype="float32")
    assert v.n_layers == 4 and v.dtype == torch.float32
    with pytest.raises(EmoscopeError, match="cannot load model"):
        load_model(str(tiny_dir / "missing"))
    with pytest.raises(EmoscopeError, match="GGUF file not found"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(EmoscopeError, match="unknown dtype"):
        load_model(str(tiny_dir), dtype="int3")


def test_auto_dtype():
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_weights_are_described_for_results():
    """What the reference weights are, read from the GGUF header (fast) or the checkpoint's config."""
    from emoscope.models import REGISTRY, gguf_file_type

    try:
        files = {name: spec.gguf() for name, spec in REGISTRY.items()}
    except Exception:
        pytest.skip("embedded GGUF packages not installed")
    assert gguf_file_type(files["gemma3-270m"]) == "Q4_K_M" and gguf_file_type(files["smollm2-135m-instruct"]) == "Q4_1"


def test_a_gguf_is_parsed_once_into_the_cache_and_not_again(tmp_path, monkeypatch):
    """transformers reads a GGUF's metadata for the tokenizer, the config and the weights: one gguf reader serves
    all three while the cache is filled; a second load reads the cache only."""
    import gguf

    from tiny import tiny_gguf

    try:
        path = tiny_gguf(tmp_path / "tiny.gguf")
    except Exception:
        pytest.skip("embedded GGUF packages not installed")
    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path / "cache"))
    real, built = gguf.GGUFReader, []
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: built.append(a) or real(*a, **k))
    counting = gguf.GGUFReader
    v = load_model(str(path), device="cpu", dtype="float32")
    assert len(built) == 1 and gguf.GGUFReader is counting  # restored to what it was before the load
    again = load_model(str(path), device="cpu", dtype="float32")
    assert len(built) == 1
    ids = torch.tensor([v.tokenizer("I am so happy").input_ids])
    torch.testing.assert_close(v.model(input_ids=ids).logits, again.model(input_ids=ids).logits, rtol=0, atol=0)
    weights = {t.name: t.data for t in real(path).tensors}
    torch.testing.assert_close(v.model.model.embed_tokens.weight, torch.tensor(weights["token_embd.weight"]))
