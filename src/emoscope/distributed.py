"""Data parallelism over examples and SAE-training tokens, with `torch.distributed` as the engine.

Launched by `torchrun --nproc_per_node N -m emoscope run --config ...` (or `accelerate launch`), every
rank runs the same program on the same inputs (SPMD). Only the loops over model forwards are shared out:
each rank takes a contiguous block of the *same* batches one process would run (`my_batches`), so each
batch is computed exactly as it would be alone, and the per-batch results come back together in the
original order on every rank (`gather`). Everything after a gather (statistics, selections, the
steering search) then runs on identical data on every rank and takes identical decisions; rank 0
alone writes files. An `EmoscopeError` on one rank inside a shared loop is raised on every rank at
the gather, so no rank waits for a partner that gave up; a rank that dies is torn down by torchrun.

With one process (no `WORLD_SIZE` in the environment, or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .errors import EmoscopeError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu", timeout_minutes: float = 30.0) -> None:
    """Join the process group the launcher describes (gloo on CPU, nccl on CUDA); once per process."""
    if dist.is_initialized() or not launched():
        return
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def env_rank() -> int:
    """This process's rank as the launcher set it (readable before `init`)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def my_batches(n: int) -> range:
    """This rank's contiguous block of `n` batches (ranks in order cover 0..n-1 once)."""
    r, w = rank(), world_size()
    return range(n * r // w, n * (r + 1) // w)


def my_items(items: Sequence) -> list:
    """This rank's contiguous block of a list (of batches)."""
    return [items[i] for i in my_batches(len(items))]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(local: Callable[[], list]) -> list:
    """Run `local()` (this rank's per-batch results, in batch order) and return every rank's results
    concatenated in rank order on every rank: with blocks from `my_batches`, the results of all batches
    in their original order. An EmoscopeError on any rank is raised on all of them."""
    try:
        parts, err = local(), None
    except EmoscopeError as e:
        if world_size() == 1:
            raise
        parts, err = [], str(e)
    if world_size() == 1:
        return parts
    everyone = gather_objects((parts, err))
    failed = [e for _, e in everyone if e is not None]
    if failed:
        raise EmoscopeError(failed[0])
    return [p for ps, _ in everyone for p in ps]


def concat(parts: list[np.ndarray], empty_shape: tuple = (0,)) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (float64 rows filled by one rank each stay exact)."""
    if world_size() > 1:
        _all_reduce(t, dist.ReduceOp.SUM)
    return t


def all_min(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    _all_reduce(t, dist.ReduceOp.MIN)
    return int(t)


def _all_reduce(t: torch.Tensor, op) -> None:
    """all_reduce in place, through this rank's GPU when the backend (nccl) takes only CUDA tensors."""
    if backend() == "nccl" and t.device.type != "cuda":
        on = t.to(f"cuda:{local_rank()}")
        dist.all_reduce(on, op=op)
        t.copy_(on.cpu())
    else:
        dist.all_reduce(t, op=op)


def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank (e.g. whether to checkpoint now)."""
    return bool(gather_objects(flag)[0]) if world_size() > 1 else flag


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. creates a folder, converts a model into a cache); the others
    run it after, when its outputs exist."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
