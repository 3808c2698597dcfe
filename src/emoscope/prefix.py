"""The token prefix a batch of prompts shares (decoded once, then reused by every prompt): no dependencies, so
both backends' scoring can use it."""

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
