"""On-disk activation store: sharded safetensors plus a JSON manifest, read back in batches, and the
capture that fills one from forward passes.

Layout of a store folder:
  manifest.json        model, d_model, hooks, dtype, positions, source (dataset, template), shard sizes,
                       example ids (row `example_idx` points into that list)
  shard-00000.safetensors   one tensor per hook [n, d_model] and `token_ids`, `example_idx`, `position` [n]
The writer fills a temporary folder and renames it into place on `close()`, so a store that exists is
complete. Reading never loads more than one shard's slice at a time.
"""

from __future__ import annotations


import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed as dist
from . import profiling
from .errors import EmoscopeError
from .hooks import HookPoint, pad_after_prefix, pad_batch, prefix_cache, record, repeat_cache
from .prefix import common_prefix, sliding_window
from .backends.base import Backend


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreWriter:
    def __init__(self, path: str | Path, manifest: dict, dtype: str = "float32", shard_tokens: int = 65536,
                 example_ids: list[str] = ()):
        """`example_ids`: the ids rows will carry, in order, when known in advance (a rank writing its
        part of a store numbers its rows' examples as the whole store does)."""
        if dtype not in DTYPES:
            raise EmoscopeError(f"unknown store dtype '{dtype}': choose {', '.join(DTYPES)}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        self.manifest = {**manifest, "dtype": dtype, "shards": [], "example_ids": []}
        self.dtype, self.shard_tokens = DTYPES[dtype], shard_tokens
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.n_pending = 0
        self._ids: dict[str, int] = {e: i for i, e in enumerate(dict.fromkeys(example_ids))}

    def add(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, example_ids: list[str],
            position: torch.Tensor) -> None:
        """Append rows: activations per hook [n, d], and per row its token id, example id and position."""
        idx = torch.tensor([self._ids.setdefault(e, len(self._ids)) for e in example_ids], dtype=torch.int64)
        rows = {**{h: a.detach().to("cpu", self.dtype) for h, a in acts.items()},
                "token_ids": token_ids.to("cpu", torch.int64), "example_idx": idx, "position": position.to("cpu",
                                                                                                           torch.int64)}
        for k, v in rows.items():
            self.pending.setdefault(k, []).append(v)
        self.n_pending += len(idx)
        if self.n_pending >= self.shard_tokens:
            self._flush()

    @profiling.timed("io")
    def _flush(self) -> None:
        if not self.n_pending:
            return
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in self.pending.items()}, self.tmp / name)
        self.manifest["shards"].append({"file": name, "rows": self.n_pending})
        self.pending, self.n_pending = {}, 0

    def close(self) -> "Store":
        self._flush()
        self.manifest["example_ids"] = list(self._ids)
        self.manifest["rows"] = sum(s["rows"] for s in self.manifest["shards"])
        (self.tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return Store(self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Store:
    def __init__(self, path: str | Path, model_name: str | None = None, d_model: int | None = None):
        self.path = Path(path)
        f = self.path / "manifest.json"
        if not f.is_file():
            raise EmoscopeError(f"{self.path} is not an activation store (no manifest.json)")
        self.manifest = json.loads(f.read_text())
        if model_name is not None and self.manifest.get("model") != model_name:
            raise EmoscopeError(f"activation store {self.path} was written by model '{self.manifest.get('model')}', "
                                f"not '{model_name}'")
        if d_model is not None and self.manifest.get("d_model") != d_model:
            raise EmoscopeError(f"activation store {self.path} has d_model={self.manifest.get('d_model')}, the model "
                                f"has {d_model}")

    @property
    def hooks(self) -> list[str]:
        return self.manifest["hooks"]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def batches(self, keys: list[str], batch_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive rows of the given keys (hooks or token_ids/example_idx/position), shard by shard."""
        missing = [k for k in keys if k not in self.hooks + ["token_ids", "example_idx", "position"]]
        if missing:
            raise EmoscopeError(f"activation store {self.path} has no {', '.join(missing)} (hooks: "
                                f"{', '.join(self.hooks)})")
        for shard in self.manifest["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                for i in range(0, shard["rows"], batch_size):
                    with profiling.section("io"):
                        rows = {k: f.get_slice(k)[i:i + batch_size] for k in keys}
                    yield rows

    def read(self, key: str) -> torch.Tensor:
        """A whole column (for small stores: final-token activations of a few hundred prompts)."""
        return torch.cat([b[key] for b in self.batches([key], 1 << 30)])


def capture_to_store(view: Backend, encoded: list[tuple[list[int], list[int]]], example_ids: list[str],
                     hooks: list[HookPoint], positions: str, path, source: dict | None = None, dtype: str = "float32",
                     batch_size: int = 8, progress=None) -> Store:
    """One forward per batch of prompts records every hook; each prompt's chosen positions go to a store.
    `encoded` holds (token ids, positions to keep) per prompt, e.g. from `Task.positions`. With several
    ranks, each captures its block of batches into a part and rank 0 joins the parts in order."""
    return capture_to_stores(view, [ids for ids, _ in encoded], {positions: [pos for _, pos in encoded]},
                             example_ids, hooks, {positions: path}, source, dtype, batch_size, progress)[positions]


@torch.no_grad()
def capture_to_stores(view: Backend, prompts: list[list[int]], keep: dict[str, list[list[int]]],
                      example_ids: list[str], hooks: list[HookPoint], paths: dict, source: dict | None = None,
                      dtype: str = "float32", batch_size: int = 8, progress=None) -> dict[str, Store]:
    """Several stores from one forward per batch of prompts: `keep[name]` gives each prompt's positions for
    the store at `paths[name]` (e.g. the final prompt token's and every text token's), so prompts read at two
    sets of positions are run once. The tokens every prompt starts with, up to the first position kept (the
    instruction and any demonstrations), run once and are cached; each batch runs its prompts' own tokens."""
    several = dist.world_size() > 1
    parts = {k: Path(p).with_name(f"{Path(p).name}.part{dist.rank()}") if several else Path(p)
             for k, p in paths.items()}
    writers = {k: StoreWriter(parts[k], {"model": view.name, "d_model": view.d_model, "hooks": [h.name for h in hooks],
                                         "positions": k, "source": source or {}}, dtype,
                              example_ids=example_ids if several else ()) for k in keep}
    P, shared = _shared_prefix(view, prompts, keep)
    try:
        for i in dist.my_items(range(0, len(prompts), batch_size)):
            chunk, eids = prompts[i:i + batch_size], example_ids[i:i + batch_size]
            acts, col = _suffix_forward(view, chunk, P, shared, hooks)
            for k, w in writers.items():
                pos = keep[k][i:i + batch_size]
                rows = torch.tensor([r for r, p in enumerate(pos) for _ in p], dtype=torch.long)
                cols = torch.tensor([c for p in pos for c in p], dtype=torch.long)
                w.add({h.name: acts[h.name][rows, cols + col[rows]] for h in hooks},
                      torch.tensor([chunk[r][c] for r, c in zip(rows.tolist(), cols.tolist())], dtype=torch.long),
                      [eids[r] for r in rows.tolist()], cols)
            if progress:
                progress(len(chunk))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stores = {k: w.close() for k, w in writers.items()}
    if not several:
        return stores
    dist.barrier()
    if dist.is_main():
        for k, p in paths.items():
            join_parts([Path(p).with_name(f"{Path(p).name}.part{r}") for r in range(dist.world_size())], Path(p))
    dist.barrier()
    return {k: Store(p) for k, p in paths.items()}


def _shared_prefix(view: Backend, prompts: list[list[int]], keep: dict[str, list[list[int]]]):
    """The number of tokens every prompt starts with and none keeps, and their KV cache (one row; None when
    no prefix is shared, or past the model's attention window, where padding after it would shift the window)."""
    first_kept = min((min(p) for pos in keep.values() for p in pos if p), default=0)
    P = min(common_prefix(prompts), first_kept)
    if P < 1 or max(len(p) for p in prompts) > sliding_window(view.model):
        return 0, None
    return P, prefix_cache(view, prompts[0][:P])


def _suffix_forward(view: Backend, chunk: list[list[int]], P: int, shared, hooks: list[HookPoint]):
    """The hooks' activations [B, T, d] of one batch of prompts, and per row the column of its position 0
    (negative after a shared prefix: position p sits at column p + col[row])."""
    if shared is None:
        ids, mask = pad_batch(chunk, view.device)
        pos, cache, col = None, None, torch.zeros(len(chunk), dtype=torch.long)
    else:
        ids, mask, pos = pad_after_prefix([p[P:] for p in chunk], P, view.device)
        cache = repeat_cache(shared, len(chunk))
        col = torch.tensor([ids.shape[1] - len(p) for p in chunk], dtype=torch.long)
    with record(view, hooks, stop=True) as acts:  # no block after the deepest hook runs
        view.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=cache is not None)
    return acts, col


def join_parts(parts: list[Path], path: Path) -> None:
    """One store from parts written with the same example numbering, rows in part order; the parts'
    shard files are moved, not copied, and the parts removed."""
    manifests = [json.loads((p / "manifest.json").read_text()) for p in parts]
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    manifest = {**manifests[0], "shards": [], "example_ids": max((m["example_ids"] for m in manifests), key=len)}
    for p, m in zip(parts, manifests):
        for shard in m["shards"]:
            name = f"shard-{len(manifest['shards']):05d}.safetensors"
            os.replace(p / shard["file"], tmp / name)
            manifest["shards"].append({"file": name, "rows": shard["rows"]})
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
