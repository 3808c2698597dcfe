"""Activation capture with forward hooks on the Hugging Face model itself (no re-implementation).

Hook points follow TransformerLens names: `blocks.{L}.hook_resid_post` (block output),
`blocks.{L}.hook_attn_out` and `blocks.{L}.hook_mlp_out` (what attention / MLP add to the residual:
after Gemma's post-norms where the block has them). One forward pass records every requested hook.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EmoscopeError
from .models import ModelView

KINDS = ("resid_post", "attn_out", "mlp_out")
_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    kind: str = "resid_post"

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    @classmethod
    def parse(cls, name: str) -> "HookPoint":
        m = _NAME.match(name)
        if not m:
            raise EmoscopeError(f"unknown hook '{name}': expected blocks.<L>.hook_<resid_post|attn_out|mlp_out>")
        return cls(int(m.group(1)), m.group(2))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def hook_module(view: ModelView, hp: HookPoint) -> nn.Module:
    """The module whose output is the hook point's activation."""
    block = view.blocks[view.check_layer(hp.layer)]
    if hp.kind == "resid_post":
        return block
    names = {"attn_out": ["post_attention_layernorm", "self_attn", "attn", "attention"],
             "mlp_out": ["post_feedforward_layernorm", "mlp", "feed_forward"]}[hp.kind]
    if hp.kind == "attn_out" and not hasattr(block, "post_feedforward_layernorm"):
        names = names[1:]  # only Gemma-style blocks norm the attention output before adding it
    for n in names:
        if isinstance(getattr(block, n, None), nn.Module):
            return getattr(block, n)
    raise EmoscopeError(f"cannot find the {hp.kind} module in {type(block).__name__}")


@contextmanager
def record(view: ModelView, hooks: list[HookPoint], detach: bool = True):
    """Within the block, every forward stores each hook's activation [batch, seq, d] in the yielded dict."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for hp in hooks:
        def fn(mod, inp, out, name=hp.name):
            t = _first(out)
            acts[name] = t.detach() if detach else t
        handles.append(hook_module(view, hp).register_forward_hook(fn))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def all_resid(view: ModelView) -> list[HookPoint]:
    return [HookPoint(l, "resid_post") for l in range(view.n_layers)]


POSITIONS = ("last", "text", "all")


def token_positions(builder, text: str, mode: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt for `text` and the positions to keep: the final prompt token (the one
    that predicts the label), every token overlapping the text, or every token after the first."""
    if mode not in POSITIONS:
        raise EmoscopeError(f"unknown positions '{mode}': choose {', '.join(POSITIONS)}")
    prompt, (a, b) = builder.prompt_with_span(text)
    special = not (builder.tok.bos_token and prompt.startswith(builder.tok.bos_token))
    enc = builder.tok(prompt, add_special_tokens=special, return_offsets_mapping=True)
    ids = enc.input_ids
    if mode == "last":
        return ids, [len(ids) - 1]
    if mode == "all":
        return ids, list(range(1, len(ids)))
    keep = [i for i, (s, e) in enumerate(enc.offset_mapping) if e > a and s < b and e > s]
    return ids, keep


@torch.no_grad()
def capture_to_store(view: ModelView, builder, examples, hooks: list[HookPoint], positions: str, path,
                     source: dict | None = None, dtype: str = "float32", batch_size: int = 8, progress=None):
    """One forward per batch of prompts records every hook; the chosen positions go to a store."""
    from .sae.evaluate import pad_batch
    from .store import StoreWriter

    writer = StoreWriter(path, {"model": view.name, "d_model": view.d_model, "hooks": [h.name for h in hooks],
                                "positions": positions, "source": source or {}}, dtype)
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            enc = [token_positions(builder, e.text, positions) for e in batch]
            ids, mask = pad_batch([ids for ids, _ in enc], view.device)
            with record(view, hooks) as acts:
                view.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            rows = torch.tensor([r for r, (_, pos) in enumerate(enc) for _ in pos])
            cols = torch.tensor([p for _, pos in enc for p in pos])
            writer.add({h.name: acts[h.name][rows, cols] for h in hooks}, ids[rows, cols],
                       [batch[r].id for r in rows.tolist()], cols)
            if progress:
                progress(len(batch))
    except BaseException:
        writer.abort()
        raise
    return writer.close()
