"""The smallest mixed-precision build predicted to pass the gate, from per-group measurements (pure, no I/O).

Each group g of tensors (a layer, a few layers, the embeddings) keeps, at a higher type, `gain[g]` flipped examples
(of n) off a `base` count and adds `cost[g]` bytes; the caller measures both (from everything at the target type
but g, or from g alone at the target). The prediction is additive: a build that keeps the set H high flips
base - sum_{g in H} gain[g] examples. Under that
model the cheapest H whose prediction meets the threshold is a 0/1 knapsack over integer gains, solved exactly by
dynamic programming (groups with no positive gain never help and are left out). The built file is then measured,
because interactions between groups are not in the model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Recipe(NamedTuple):
    keep: list[int]
    """Indices of the groups kept at the high type."""
    predicted_flips: int
    """Flipped examples the additive model predicts for the build."""
    added_bytes: int
    """Bytes the kept groups add to the uniform target file."""
    feasible: bool
    """Whether the prediction meets the threshold (else `keep` is every helpful group: the best the model offers)."""


def cheapest(base: int, gain: list[int], cost: list[int], allowed: int) -> Recipe:
    """The cheapest set of groups whose summed gains bring `base` flips down to at most `allowed`."""
    need = base - allowed
    useful = [i for i, g in enumerate(gain) if g > 0]
    if need <= 0:
        return Recipe([], base, 0, True)
    total = sum(gain[i] for i in useful)
    if total < need:
        return Recipe(useful, base - total, int(sum(cost[i] for i in useful)), False)
    # best[s]: the cheapest (cost, groups) reaching a summed gain of exactly min(s, need)
    best: list[tuple[float, tuple[int, ...]] | None] = [None] * (need + 1)
    best[0] = (0.0, ())
    for i in useful:
        for s in range(need, -1, -1):
            if best[s] is None:
                continue
            t = min(need, s + gain[i])
            c = best[s][0] + cost[i]
            if best[t] is None or c < best[t][0]:
                best[t] = (c, best[s][1] + (i,))
    c, keep = best[need]
    return Recipe(sorted(keep), base - int(sum(gain[i] for i in keep)), int(c), True)


def brute_force(base: int, gain: list[int], cost: list[int], allowed: int) -> tuple[float, tuple[int, ...]] | None:
    """Every subset tried (for tests): the cheapest (cost, groups) meeting the threshold, or None."""
    n, found = len(gain), None
    for mask in range(1 << n):
        keep = tuple(i for i in range(n) if mask >> i & 1)
        if base - sum(gain[i] for i in keep) <= allowed:
            c = float(np.sum([cost[i] for i in keep])) if keep else 0.0
            if found is None or c < found[0]:
                found = (c, keep)
    return found
