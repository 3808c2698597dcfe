"""Answer passes: the label logits at each prompt's answer position, with the residuals of chosen
layers, and batches of prompts whose tokens before the answer run once and are cached.

Every intervention in emoscope acts at the answer position and attention is causal, so the tokens
before it never change: they run once, and each ablation, attribution or steering pass runs one token
per example.
"""

from __future__ import annotations


import copy
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as dist
from .. import profiling
from ..hooks import HookPoint, at, pad_after_prefix, pad_batch, prefix_cache, record, repeat_cache, resid
from ..task.calibrate import CONTENT_FREE
from ..prefix import common_prefix, sliding_window
from ..backends.base import Backend



BATCH = 64
"""Prompts per answer batch: one answer-token pass reads every weight once whatever the batch, so larger
batches are cheaper per prompt (64 vs 16: half the time per prompt on Gemma-3-270M, 2-core CPU), while the
prefix passes barely slow down (the shared instruction runs once, only the texts are padded)."""


def answer_logits(view: Backend, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, tokens: list[int],
                  record_layers: list[int] = (), past=None, pos: torch.Tensor | None = None,
                  sites: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Label first-token logits at each row's answer position `last` [n, K] (or at `sites`, (rows,
    positions) index tensors), and the residuals [n, T, d] of the given layers (kept in the graph, for
    gradients). With `past` (a KV cache of the tokens before `ids`, used up) and `pos` (their position
    ids), only `ids` run. `mask` is [n, T] or a boolean [n, 1, T, cached + T] (True: may attend)."""
    if mask.dim() == 4:  # additive, as every attention implementation reads a custom 4D mask
        mask = torch.zeros(mask.shape, dtype=view.model.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(view.model.dtype).min)
    layers = sorted(set(record_layers) | {view.n_layers - 1})
    with record(view, [HookPoint(layer) for layer in layers], detach=False) as acts:
        # the base model, without the LM head: only the label tokens' logits are needed
        view.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                              use_cache=past is not None)
    out = acts[resid(view.n_layers - 1)]
    final = out[at(out, last) if sites is None else tuple(i.to(out.device) for i in sites)]
    logits = view.logits_from_resid(final, tokens).float()
    return logits, {layer: acts[resid(layer)] for layer in record_layers}


def prompt_batches(view: Backend, prompts: list[list[int]], batch_size: int = 8):
    """(start, ids, mask, last) for consecutive batches of token lists, right-padded; `last` is each
    row's answer position (its final real token). With several ranks, this rank's block of batches
    only: whoever collects per-batch results gathers them (`distributed.gather`)."""
    for i in dist.my_items(range(0, len(prompts), batch_size)):
        chunk = prompts[i:i + batch_size]
        ids, mask = pad_batch(chunk, view.device)
        yield i, ids, mask, torch.tensor([len(p) - 1 for p in chunk], device=view.device)


@torch.no_grad()
def answer_resid(view: Backend, prompts: list[list[int]], layers: list[int], tokens: list[int],
                 batch_size: int = BATCH):
    """Per batch of prompts (this rank's, see prompt_batches), the residual at each answer position of
    every given layer: yields {layer: [B, d] float32}. `prompts` may be answer_batches() (their caches are
    kept); otherwise each batch's prefix cache lives only while its batch runs."""
    given = _given(prompts)
    for b in prompts if given else _answer_batches(view, prompts, batch_size):
        _, res = b.logits(view, tokens, layers, copy_cache=given)
        yield {layer: res[layer][at(res[layer], b.last)].float() for layer in layers}


def first_token_prior(task) -> torch.Tensor:
    """Contextual-calibration prior over the labels' first tokens: the mean label distribution of the
    task's prompt on content-free inputs, in log space [K]."""
    prompts = task.encode_all(CONTENT_FREE)
    lp = torch.log_softmax(task.model.label_logits(prompts, task.label_tokens), -1)
    return torch.logsumexp(lp, 0) - np.log(len(prompts))


@dataclass
class AnswerBatch:
    """Prompts whose answer position runs again and again (every ablation, every steering strength).
    With `cache`, everything before each row's answer token already ran once and its KV cache is
    kept: a pass runs the answer tokens only. Exact, because every intervention here acts at the
    answer position and attention is causal, so no earlier position can change."""
    start: int  # index of the first row in the prompt list
    ids: torch.Tensor  # [B, 1] answer tokens (cached) or [B, T] whole prompts, right-padded
    mask: torch.Tensor  # attention mask over cached tokens + ids
    last: torch.Tensor  # answer position of each row within ids
    pos: torch.Tensor | None = None  # position ids of ids, when cached
    cache: object | None = None

    def logits(self, view: Backend, tokens: list[int], record_layers: list[int] = (), copy_cache: bool = True,
               sites: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Label logits and recorded residuals of a pass over the answer tokens (the cache is copied, since a
        pass appends to it, unless this is its last use); at `sites` (rows, positions) instead of each row's
        answer position when given."""
        past = self.cache if self.cache is None or not copy_cache else copy.deepcopy(self.cache)
        return answer_logits(view, self.ids, self.mask, self.last, tokens, record_layers, past, self.pos, sites)

    def copies(self, n: int, masked: bool = True) -> tuple[AnswerBatch, tuple[torch.Tensor, torch.Tensor]]:
        """The batch run n times in one pass, and the (row, position) where copy j of row r answers, at index
        r * n + j. With a cache and `masked`, each row gets its answer token n times at the same position, each
        copy attending to its prompt and to itself only (a 4D mask), so the cache is not repeated; otherwise
        the rows (and their cache) are."""
        B, dev = len(self.ids), self.ids.device
        if self.cache is None or not masked:
            rep = [None if t is None else t.repeat_interleave(n, 0) for t in (self.ids, self.mask, self.last, self.pos)]
            cache = None if self.cache is None else repeat_cache(self.cache, n)
            return AnswerBatch(self.start, *rep, cache), (torch.arange(B * n, device=dev), rep[2])
        L = self.mask.shape[1] - 1  # the cached tokens
        see = torch.cat([self.mask[:, None, :L].bool().expand(B, n, L),
                         torch.eye(n, dtype=torch.bool, device=dev).expand(B, n, n)], -1)[:, None]
        sites = (torch.arange(B, device=dev).repeat_interleave(n), torch.arange(n, device=dev).repeat(B))
        return AnswerBatch(self.start, self.ids.expand(B, n), see, self.last, self.pos.expand(B, n), self.cache), sites


class AnswerBatches(list):
    """What answer_batches returns (this rank's batches, possibly none), recognised when passed back in."""


@torch.no_grad()
def answer_batches(view: Backend, prompts, batch_size: int = BATCH) -> list[AnswerBatch]:
    """The prompts in consecutive batches, each prompt's tokens before its answer token run once and
    cached (left-padded, explicit positions). Call it with no hooks active. Prompts longer than the
    smallest sliding attention window run whole (left padding would shift the window); a list that
    already holds AnswerBatch objects is returned as it is. With several ranks, this rank's block of
    batches only (each keeps its global `start`)."""
    return prompts if _given(prompts) else AnswerBatches(_answer_batches(view, prompts, batch_size))


def _given(prompts) -> bool:
    """Whether `prompts` already are answer batches (built once by the caller and reused)."""
    return isinstance(prompts, AnswerBatches) or bool(prompts) and isinstance(prompts[0], AnswerBatch)


def _answer_batches(view: Backend, prompts: list[list[int]], batch_size: int):
    """answer_batches one at a time (each batch's prefix runs when the batch is asked for)."""
    if max(len(p) for p in prompts) > sliding_window(view.model) or min(len(p) for p in prompts) < 2:
        yield from (AnswerBatch(i, ids, mask, last) for i, ids, mask, last in prompt_batches(view, prompts, batch_size))
        return
    P, shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 2), None
    if P > 0:  # the instruction (and any demonstrations) every prompt starts with: run once
        shared = prefix_cache(view, prompts[0][:P])
    for i in dist.my_items(range(0, len(prompts), batch_size)):
        with torch.no_grad(), profiling.section("llm_forward:prefix"):
            batch = _cached_batch(view, prompts[i:i + batch_size], i, P, shared)
        yield batch


def _cached_batch(view: Backend, chunk: list[list[int]], start: int, P: int = 0, shared=None) -> AnswerBatch:
    """Each prompt's tokens before its answer token run and cached: the shared first `P` tokens from
    `shared` (their cache, one row), then each row's own tokens left-padded after them (explicit
    positions, padding masked), so every row attends to exactly its own prompt."""
    dev, B = view.device, len(chunk)
    ids, mask, pos = pad_after_prefix([p[P:-1] for p in chunk], P, dev)
    cache = view.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  past_key_values=None if shared is None else repeat_cache(shared, B),
                                  use_cache=True).past_key_values
    mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], 1)  # and the answer token
    return AnswerBatch(start, torch.tensor([[p[-1]] for p in chunk], device=dev), mask,
                       torch.zeros(B, dtype=torch.long, device=dev),
                       torch.tensor([[len(p) - 1] for p in chunk], device=dev), cache)
