"""The SAE training (and held-out evaluation) text stream: general text plus emotion texts, both plain
and inside the task prompt, so the SAEs see the distribution they will later explain.

Each document is its own sequence (no packing across documents), cut to `context` tokens and
starting the way a prompt starts (BOS where the tokenizer uses one). Sources are interleaved by a
seeded draw with the given mixing weights.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from ..data import EKMAN, data_dirs, label_set, load_split, select
from ..errors import EmoscopeError
from ..task.prompts import PromptBuilder, Template

EMOTION_SETS = ("goemotions_ekman", "isear", "dair_emotion")


def wikitext(split: str = "valid", data_dir=None) -> list[str]:
    """WikiText-2 paragraphs (headings dropped), from ../shared/data/wikitext2/<split>.txt."""
    for d in data_dirs(data_dir):
        f = Path(d) / "wikitext2" / f"{split}.txt"
        if f.is_file():
            lines = f.read_text(encoding="utf-8").splitlines()
            return [line.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
                    for line in lines if line.strip() and not line.strip().startswith("=")]
    raise EmoscopeError(f"WikiText-2 {split} not found under {', '.join(map(str, data_dirs(data_dir)))}")


def emotion_texts(split: str, data_dir=None) -> list[tuple[str, str]]:
    """(text, label) pairs from every emotion dataset that is present, Ekman labels only."""
    out = []
    for name in EMOTION_SETS:
        try:
            rows, rep = load_split(name, split, data_dir)
        except EmoscopeError:
            continue
        out += [(e.text, e.label) for e in select(rows, label_set(rows, None, "drop"), rep)]
    if not out:
        raise EmoscopeError("no emotion dataset found for the SAE corpus")
    return out


def sequences(view, split: str, context: int, seed: int, weights=(0.5, 0.25, 0.25), data_dir=None,
              template: Template | None = None) -> Iterator[list[int]]:
    """Endless seeded stream of token sequences: general text / plain emotion text / task prompts.
    split 'train' uses WikiText-2 valid and emotion train splits; 'eval' uses WikiText-2 test and dev."""
    wiki = wikitext("valid" if split == "train" else "test", data_dir)
    emo = emotion_texts("train" if split == "train" else "dev", data_dir)
    tok = view.tokenizer
    builder = PromptBuilder(tok, template or Template(), EKMAN, [], view.chat, view.max_context)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id] else []
    total = sum(weights)
    if not total > 0:
        raise EmoscopeError(f"saes.train.mix: the weights {list(weights)} must sum to more than 0")
    weights = [w / total for w in weights]  # weights, not thresholds: (1, 1, 2) = 25% / 25% / 50%
    rng = random.Random(seed)
    while True:
        r = rng.random()
        if r < weights[0]:
            ids = bos + tok(rng.choice(wiki), add_special_tokens=False).input_ids
        elif r < weights[0] + weights[1]:
            ids = bos + tok(rng.choice(emo)[0], add_special_tokens=False).input_ids
        else:
            ids = builder.encode(builder.prompt(rng.choice(emo)[0]))
        if len(ids) >= 3:
            yield ids[:context]
