"""Hook addresses, recording and padding: forward hooks on the Hugging Face model itself.

Hook points follow TransformerLens names: `blocks.{L}.hook_resid_post` (block output),
`blocks.{L}.hook_attn_out` and `blocks.{L}.hook_mlp_out` (what attention / MLP add to the residual:
after Gemma's post-norms where the block has them). One forward pass records every requested hook.
"""

from __future__ import annotations


import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import profiling
from .errors import EmoscopeError
from .backends.base import Backend


KINDS = ("resid_post", "attn_out", "mlp_out")
HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)$")
"""A TransformerLens hook name this package reads and edits."""


@dataclass(frozen=True)
class HookPoint:
    layer: int
    kind: str = "resid_post"

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    @classmethod
    def parse(cls, name: str) -> "HookPoint":
        m = HOOK_NAME.match(name)
        if not m:
            raise EmoscopeError(f"unknown hook '{name}': expected blocks.<L>.hook_<resid_post|attn_out|mlp_out>")
        return cls(int(m.group(1)), m.group(2))


def resid(layer: int) -> str:
    """The name of a layer's residual-stream output, `blocks.{layer}.hook_resid_post`."""
    return HookPoint(layer).name


def layer_of(name: str) -> int:
    return HookPoint.parse(name).layer


def residual_by_layer(saes: dict, stage: str) -> dict:
    """SAEs keyed by layer for a stage that reads and edits features on the residual stream after each block (where
    both backends edit them, at `blocks.L.hook_resid_post`); an SAE on another hook (mlp_out, attn_out) would be read
    and edited on the residual stream, wrongly and silently, so it is refused in one line."""
    other = [h for h in saes if HookPoint.parse(h).kind != "resid_post"]
    if other:
        raise EmoscopeError(f"{stage} reads and edits SAE features on the residual stream (blocks.L.hook_resid_post), "
                            f"and the SAE at {other[0]} is on another hook: give it resid_post SAEs "
                            "(saes.train.kind: resid_post, or a resid_post release); phases reads any hook")
    return {HookPoint.parse(h).layer: s for h, s in saes.items()}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def hook_module(view: Backend, hp: HookPoint) -> nn.Module:
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


class _AllRecorded(Exception):
    """Raised by `record(..., stop=True)` once every hook has fired, to end the forward there."""


@contextmanager
def record(view: Backend, hooks: list[HookPoint], detach: bool = True, stop: bool = False):
    """Within the block, every forward stores each hook's activation [batch, seq, d] in the yielded dict. With
    `stop`, a forward ends as soon as every hook has fired: the blocks after the deepest one, the final norm and
    the unembedding never run (the model call returns nothing; the block's code after it is skipped)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for hp in hooks:
        def fn(mod, inp, out, name=hp.name):
            t = _first(out)
            acts[name] = t.detach() if detach else t
            if stop and len(acts) == len(hooks):
                raise _AllRecorded
        handles.append(hook_module(view, hp).register_forward_hook(fn))
    try:
        yield acts
    except _AllRecorded:
        pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(view: Backend, hp: HookPoint, fn):
    """Within the block, every forward replaces the hook's activation t by fn(t) (a new tensor)."""
    def hook(mod, inp, out):
        t = fn(_first(out))
        return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
    h = hook_module(view, hp).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def at(t: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of position positions[b] in each row b of t [B, T, ...], on t's device (with a model spread over
    devices, a layer's activations need not be where the inputs are): t[at(t, positions)] is [B, ...]."""
    return torch.arange(len(t), device=t.device), positions.to(t.device)


def all_resid(view: Backend) -> list[HookPoint]:
    return [HookPoint(layer, "resid_post") for layer in range(view.n_layers)]


def pad_batch(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask [B, T]."""
    T = max(map(len, seqs))
    ids = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def pad_after_prefix(suffixes: list[list[int]], P: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [B, S] of suffixes that follow a shared, cached prefix of P tokens: left-padded *between* prefix
    and suffix, so every row's last token is at column S - 1; the attention mask [B, P + S] (the prefix and each
    row's own tokens) and the position ids [B, S] each token has in its whole prompt."""
    B, S = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.zeros((B, S), dtype=torch.long, device=device)
    mask = torch.zeros((B, P + S), dtype=torch.long, device=device)
    pos = torch.full((B, S), P, dtype=torch.long, device=device)
    mask[:, :P] = 1
    for i, s in enumerate(suffixes):
        ids[i, S - len(s):] = torch.tensor(s, device=device)
        mask[i, P + S - len(s):] = 1
        pos[i, S - len(s):] = torch.arange(P, P + len(s), device=device)
    return ids, mask, pos


@torch.no_grad()
def prefix_cache(view: Backend, tokens: list[int]):
    """The KV cache of one row of tokens every prompt of a batch starts with (instruction, demonstrations), run once
    through the decoder stack (no LM head)."""
    with profiling.section("llm_forward:prefix"):
        return view.model.base_model(input_ids=torch.tensor([tokens], device=view.device),
                                     use_cache=True).past_key_values


def repeat_cache(cache, n: int):
    """A copy of a KV cache with each row repeated n times (a pass appends to the cache it is given, so each pass
    gets a copy; a one-row prefix cache becomes a batch's)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out
