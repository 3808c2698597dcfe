"""Tiny random-weight models and a tiny BPE tokenizer for fast unit tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from emoscope.models import ModelView, make_view

CORPUS = [
    "I am so happy today, this is wonderful news!",
    "That was disgusting and gross, I feel sick.",
    "I'm terrified of what might happen tomorrow.",
    "Why would you do that? I am furious with you.",
    "I miss her so much, everything feels empty.",
    "Wow, I did not expect that at all!",
    "Classify the emotion expressed in the text. Answer with one word from: anger, disgust, fear, joy, sadness, "
    "surprise.",
    "Text: Emotion: The quick brown fox jumps over the lazy dog.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 4, d: int = 32,
               sliding_window: int = 16, n_heads: int = 4) -> ModelView:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=1024,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig
        cfg = Gemma3TextConfig(**common, head_dim=8, sliding_window=sliding_window, query_pre_attn_scalar=8,
                               layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))
    elif arch == "gpt2":
        from transformers import GPT2Config
        cfg = GPT2Config(vocab_size=len(tok), n_embd=d, n_layer=n_layers, n_head=4, n_positions=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif arch == "qwen2":
        from transformers import Qwen2Config
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return make_view(model, tok, f"tiny-{arch}", chat=False)


def save_tiny(view: ModelView, path: Path) -> Path:
    view.model.save_pretrained(path, safe_serialization=True)
    view.tokenizer.save_pretrained(path)
    return path


# Qwen2.5-Instruct's chat template without its tool branch: a system turn with Qwen's default prompt when none is given
QWEN_CHAT = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)


def tiny_gguf(path: Path, n_layers: int = 2, d: int = 64, n_heads: int = 2, n_kv: int = 1, seed: int = 0,
              arch: str = "llama") -> Path:
    """A tiny random-weight Llama (or Qwen2: attention biases, Qwen's chat template) as an F32 GGUF with SmolLM2's
    tokenizer (copied from the embedded file's metadata), the layout llama.cpp's converter writes: both backends load
    it (transformers dequantises it, llama.cpp runs it)."""
    import gguf
    import numpy as np

    from emoscope.models import REGISTRY

    src = gguf.GGUFReader(REGISTRY["smollm2-135m-instruct"].gguf())
    rng = np.random.default_rng(seed)
    vocab, ff, hd = len(src.fields["tokenizer.ggml.tokens"].data), 2 * d, d // n_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for key, field in src.fields.items():
        if key.startswith("tokenizer.") and not (arch == "qwen2" and key in ("tokenizer.chat_template",
                                                                               "tokenizer.ggml.pre")):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    if arch == "qwen2":  # Qwen's pre-tokenizer and chat template (transformers converts a qwen2 file's tokenizer so)
        w.add_chat_template(QWEN_CHAT)
        w.add_tokenizer_pre("qwen2")

    def t(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)
    w.add_tensor("token_embd.weight", t(vocab, d, scale=1.0))
    w.add_tensor("output_norm.weight", 1 + 0.1 * t(d, scale=1.0))
    for i in range(n_layers):
        norms = {"attn_norm": 1 + 0.1 * t(d, scale=1.0), "ffn_norm": 1 + 0.1 * t(d, scale=1.0)}
        mats = {"attn_q": t(d, d), "attn_k": t(n_kv * hd, d), "attn_v": t(n_kv * hd, d), "attn_output": t(d, d),
                "ffn_gate": t(ff, d), "ffn_up": t(ff, d), "ffn_down": t(d, ff)}
        for name, arr in {**norms, **mats}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
        if arch == "qwen2":  # Qwen2's q, k and v projections have biases
            for name, n in (("attn_q", d), ("attn_k", n_kv * hd), ("attn_v", n_kv * hd)):
                w.add_tensor(f"blk.{i}.{name}.bias", 0.1 * t(n, scale=1.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
