"""Audit candidates: quantization error bounds, precision changes, prompt and text perturbations."""

import random

import numpy as np

import pytest
import torch

from emoscope.interventions.perturb import (apply_precision, perturb_text, precision_applied, rtn_quantize_,
                                            template_variants)
from emoscope.errors import EmoscopeError
from emoscope.task.prompts import Template
from tiny import tiny_model


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_rtn_error_within_half_step(bits):
    w = torch.randn(16, 300) * torch.rand(16, 1) * 5
    ref = w.clone()
    step = rtn_quantize_(w, bits, group_size=64)
    err = (w - ref).abs()
    bound = step.repeat_interleave(64, 1)[:, :300] / 2
    assert (err <= bound + 1e-6).all()
    levels = 2 ** bits - 1
    for r in range(3):  # at most 2^b - 1 distinct values per group
        assert len(torch.unique(w[r, :64])) <= levels
    if bits == 8:  # 8 bits: relative error at most 1/254 of the group max
        assert (err <= ref.abs().view(16, -1).amax() / 254 + 1e-6).all()


def test_apply_precision_and_unknown_schemes():
    v = tiny_model("llama")
    before = v.blocks[0].mlp.down_proj.weight.clone()
    info = apply_precision(v, "int4", group_size=16)
    assert info["linear_layers"] == 4 * 7 and not torch.equal(before, v.blocks[0].mlp.down_proj.weight)
    assert torch.equal(tiny_model("llama").model.get_input_embeddings().weight, v.model.get_input_embeddings().weight)
    apply_precision(v, "bfloat16")
    assert v.dtype == torch.bfloat16
    with pytest.raises(EmoscopeError, match="unknown precision"):
        apply_precision(v, "int5x")
    with pytest.raises(EmoscopeError, match="unsupported bit width"):
        rtn_quantize_(torch.randn(2, 8), 1)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_precision_in_place_is_undone_bit_for_bit(arch, tmp_path, monkeypatch):
    """The audit changes the loaded model in place; afterwards every parameter and buffer (dtype and bytes)
    and the logits are as before, and the originals were parked on disk, not in memory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    v = tiny_model(arch)
    before = {n: t.clone() for n, t in [*v.model.named_parameters(), *v.model.named_buffers()]}
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    clean = v.model(ids).logits
    for precision in ["bfloat16", "float16", "int8", "int4", "int3"]:
        with precision_applied(v, precision, group_size=16) as info:
            changed = v.model(ids).logits
            assert info["precision"] == precision and not torch.equal(changed.float(), clean)
            assert any(p.name.startswith("emoscope-weights-") for p in tmp_path.iterdir())
        after = dict([*v.model.named_parameters(), *v.model.named_buffers()])
        assert all(before[n].dtype == after[n].dtype and torch.equal(before[n], after[n]) for n in before), precision
        assert torch.equal(v.model(ids).logits, clean)
    assert not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(RuntimeError, match="planted"):  # undone after an error too
        with precision_applied(v, "int4", group_size=16):
            raise RuntimeError("planted")
    assert torch.equal(v.model(ids).logits, clean)


def test_text_and_template_perturbations():
    rng = random.Random(0)
    t = "I am really quite happy about this wonderful news"
    assert perturb_text(t, "lower", rng) == t.lower()
    typo = perturb_text(t, "typos", rng, rate=0.3)
    assert typo != t and sorted(typo) == sorted(t)
    with pytest.raises(EmoscopeError, match="unknown text perturbation"):
        perturb_text(t, "emoji", rng)
    labels = ["anger", "joy", "fear"]
    vs = template_variants(Template(), labels)
    assert sum(k.startswith("paraphrase") for k in vs) >= 5
    assert all("{options}" in v.instruction for v in vs.values())
    order = vs["label_order_permuted"].label_order
    assert sorted(order) == sorted(labels) and order != labels
    assert vs["system_prompt"].system and template_variants(Template(system="x"),
                                                            labels)["system_prompt"].system is None


def test_gguf_types_are_llama_cpp_bit_exact():
    """A gguf:TYPE candidate holds exactly gguf.dequantize(gguf.quantize(w)) in every tensor llama.cpp stores in
    that type (the blocks' 2-D weights and this untied embedding; the output projection, Q6_K in llama.cpp,
    stays), and is undone."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize
    from emoscope.interventions.perturb import check_precision, gguf_types

    assert {"Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"} <= set(gguf_types())
    v = tiny_model("llama")  # d_model 32: rows a multiple of the 32-value blocks
    weights = {n: p.detach().clone() for n, p in v.model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    clean = v.model(ids).logits
    for t in ("Q8_0", "Q4_0", "Q5_1"):
        with precision_applied(v, f"gguf:{t}") as info:
            assert info["tensors"] == 4 * 7 + 1 and info["method"].startswith(f"llama.cpp {t}")
            for n, p in v.model.named_parameters():
                w = weights[n].numpy()
                if (n.startswith("model.layers.") and p.dim() == 2) or n == "model.embed_tokens.weight":
                    kind = getattr(gguf.GGMLQuantizationType, t)
                    want = dequantize(quantize(w, kind), kind).reshape(w.shape)
                    assert np.array_equal(p.detach().numpy(), want), n
                else:
                    assert torch.equal(p, weights[n]), n
        assert torch.equal(v.model(ids).logits, clean)
    with pytest.raises(EmoscopeError, match="gguf:Q8_0"):
        check_precision("gguf:Q4_K")  # k-quants: the gguf package cannot produce them, listed choices instead
