"""The token prefix a batch of prompts shares (decoded once, then reused by every prompt), and the attention window
that bounds where it may be reused: no dependencies, so both backends' scoring can use it."""

from __future__ import annotations


def common_prefix(seqs: list[list[int]], keep: int = 1) -> int:
    """Tokens every sequence starts with, leaving each at least `keep` tokens of its own (1: a prompt's last
    logits are needed)."""
    n = min(len(s) for s in seqs) - keep
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def sliding_window(model) -> int:
    """Smallest attention window of any layer of a transformers model (a huge number when no layer slides): past
    it, padding between a cached prefix and a suffix would shift the window."""
    cfg = model.config.get_text_config()
    win = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not win or (types is not None and "sliding_attention" not in types):
        return 1 << 30
    return int(win)
