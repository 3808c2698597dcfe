"""Activation store: round trip, positions, batched reading, refusal of another model's store."""

import pytest
import torch

from emoscope.hooks import HookPoint, record
from emoscope.store import capture_to_store, capture_to_stores
from emoscope.data import EKMAN, Example
from emoscope.errors import EmoscopeError
from emoscope.task import Task
from emoscope.store import Store, StoreWriter
from tiny import CORPUS


def _builder(view, data):
    return Task(view, dataset=str(data), labels=EKMAN)


def test_text_positions_cover_exactly_the_text(tiny_llama, toy_data):
    b = _builder(tiny_llama, toy_data)
    text = "I'm terrified of what might happen tomorrow."
    ids, pos = b.positions(text, "text")
    assert tiny_llama.tokenizer.decode([ids[p] for p in pos]).strip() == text
    ids2, last = b.positions(text, "last")
    assert ids2 == ids and last == [len(ids) - 1]
    assert b.positions(text, "all")[1] == list(range(1, len(ids)))
    with pytest.raises(EmoscopeError, match="unknown positions"):
        b.positions(text, "middle")


@pytest.mark.parametrize("positions,dtype", [("last", "float32"), ("text", "bfloat16")])
def test_store_round_trip(tiny_llama, tmp_path, positions, dtype, toy_data):
    b = _builder(tiny_llama, toy_data)
    ex = [Example(f"e{i}", t, ("joy",)) for i, t in enumerate(CORPUS[:5])]
    hooks = [HookPoint(0), HookPoint(3)]
    store = capture_to_store(tiny_llama, [b.positions(e.text, positions) for e in ex], [e.id for e in ex], hooks,
                             positions, tmp_path / "s", dtype=dtype, batch_size=2)
    # reference: one prompt at a time, no padding
    ref, n = {h.name: [] for h in hooks}, 0
    for e in ex:
        ids, pos = b.positions(e.text, positions)
        with torch.no_grad(), record(tiny_llama, hooks) as acts:
            tiny_llama.model(input_ids=torch.tensor([ids]))
        for h in hooks:
            ref[h.name].append(acts[h.name][0, pos])
        n += len(pos)
    assert len(store) == n and store.manifest["example_ids"] == [e.id for e in ex]
    tol = 1e-5 if dtype == "float32" else 2e-2
    for h in hooks:
        got = torch.cat([bt[h.name] for bt in Store(tmp_path / "s").batches([h.name], batch_size=3)])
        torch.testing.assert_close(got.float(), torch.cat(ref[h.name]), atol=tol, rtol=tol)
    rows = store.read("example_idx")
    assert rows.tolist() == sorted(rows.tolist())
    with pytest.raises(EmoscopeError, match="written by model 'tiny-llama', not 'other'"):
        Store(tmp_path / "s", model_name="other")
    with pytest.raises(EmoscopeError, match="d_model=32"):
        Store(tmp_path / "s", d_model=64)
    with pytest.raises(EmoscopeError, match="has no blocks.1.hook_resid_post"):
        next(store.batches(["blocks.1.hook_resid_post"]))


def test_two_stores_from_one_forward_equal_each_alone(tiny_llama, tmp_path, toy_data):
    """The phases stage reads the final token and the text of the same prompts: one forward per batch fills
    both stores, and each is file for file the store a capture of its positions alone writes."""
    b = _builder(tiny_llama, toy_data)
    ex = [Example(f"e{i}", t, ("joy",)) for i, t in enumerate(CORPUS[:5])]
    hooks, modes = [HookPoint(1), HookPoint(3)], ("last", "text")
    enc = {m: [b.positions(e.text, m) for e in ex] for m in modes}
    widths = []  # tokens per row of every forward through the body
    handle = tiny_llama.model.base_model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(kw["input_ids"].shape), with_kwargs=True)
    prompts = [ids for ids, _ in enc["last"]]
    try:
        both = capture_to_stores(tiny_llama, prompts, {m: [p for _, p in enc[m]] for m in modes},
                                 [e.id for e in ex], hooks, {m: tmp_path / f"both-{m}" for m in modes}, batch_size=2)
    finally:
        handle.remove()
    # the shared instruction once (one row), then 5 prompts in batches of 2, each running its own tokens only
    P = min(p for _, pos in enc["text"] for p in pos[:1])
    assert widths[0] == (1, P) and [w[0] for w in widths[1:]] == [2, 2, 1]
    assert all(w[1] == max(len(p) for p in prompts[2 * i:2 * i + 2]) - P for i, w in enumerate(widths[1:]))
    for m in modes:
        alone = capture_to_store(tiny_llama, enc[m], [e.id for e in ex], hooks, m, tmp_path / f"alone-{m}",
                                 batch_size=2)
        assert both[m].manifest == alone.manifest
        for shard in alone.manifest["shards"]:
            assert (tmp_path / f"both-{m}" / shard["file"]).read_bytes() == (alone.path / shard["file"]).read_bytes()
    assert len(both["last"]) == 5 and len(both["text"]) > 5


def test_store_is_atomic(tmp_path):
    w = StoreWriter(tmp_path / "s", {"model": "m", "d_model": 2, "hooks": ["h"]}, shard_tokens=2)
    w.add({"h": torch.ones(3, 2)}, torch.zeros(3), ["a", "a", "b"], torch.arange(3))
    assert not (tmp_path / "s").exists()  # nothing visible until close
    w.abort()
    assert not list(tmp_path.iterdir())
    with pytest.raises(EmoscopeError, match="not an activation store"):
        Store(tmp_path / "s")
