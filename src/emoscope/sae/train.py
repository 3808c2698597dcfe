"""Train the SAEs of every requested layer from one activation stream.

One forward pass of the LLM over a batch of sequences records all layers' residuals (as EleutherAI
sparsify does); the activations fill a shuffle buffer, and each layer's SAE then takes its optimiser
steps on its slice of the buffer. Activations are divided by a per-layer scale (RMS norm / sqrt(d))
during training, and the scale is folded back into the saved weights, so saved SAEs read raw
activations and report features in raw units, with unit-norm decoder rows.
"""

from __future__ import annotations


import math
import os
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import distributed as dist
from .. import profiling
from ..artifacts import config_hash
from ..hooks import HookPoint, pad_batch, record
from ..errors import EmoscopeError
from .corpus import sequences
from .model import SAE, SAEConfig
from .topk_step import _decode, _encode_topk, topk_grads
from ..constraints import NonNegative, Seed
from ..backends.base import Backend



class SAETrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    layers: list[int] | None = None
    """Layers to train SAEs for; None = every layer."""
    kind: Literal["resid_post", "attn_out", "mlp_out"] = "resid_post"
    """Hook kind at each layer."""
    architecture: Literal["topk", "jumprelu", "relu"] = "topk"
    """TopK with AuxK (fast sparse path), JumpReLU + L0, or ReLU + L1 (dense autograd)."""
    expansion: int = Field(8, ge=1)
    """d_sae = expansion * d_model."""
    k: int = Field(32, ge=1)
    """Active features per token (TopK)."""
    tokens: int = Field(120_000, ge=1000)
    """Training tokens (activations per layer); profile full: 1,000,000."""
    context: int = Field(128, ge=8)
    """Longest sequence, in tokens."""
    seqs_per_forward: int = Field(16, ge=1)
    """Sequences per LLM forward pass."""
    batch_tokens: int = Field(1024, ge=64)
    """Tokens per SAE optimiser step."""
    buffer_tokens: int = Field(16384, ge=256)
    """Shuffle-buffer size in tokens; profile full: 65,536."""
    lr: float = Field(2e-3, gt=0)
    """Adam learning rate (scaled by 1/sqrt(d_sae / 2^14) above 2^14 latents)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None = 2 * k (memory-bound on CPU)."""
    aux_coef: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss."""
    sparsity_coef: float = Field(0.05, ge=0)
    """L1 (relu) or L0 (jumprelu) penalty weight, in units of the scaled activations."""
    bandwidth: float = Field(0.05, gt=0)
    """JumpReLU straight-through-estimator bandwidth (scaled units)."""
    threshold_init: float = Field(0.1, gt=0)
    """JumpReLU initial threshold (scaled units; learned in log space)."""
    dead_tokens: int = Field(50_000, ge=1)
    """A latent unfired for this many tokens counts as dead."""
    resample_every: int = Field(0, ge=0)
    """TopK: every this many steps (in the first 70% of training), re-initialise dead latents on poorly reconstructed
    inputs; 0 = never."""
    fast_matmul: Literal["auto", "float32", "bfloat16"] = "auto"
    """Encoder matmul dtype; auto = bf16 on CUDA, on CPUs with AMX and on AMD CPUs with AVX512-BF16, float32
    elsewhere (faster there: an Intel Xeon with AVX512-BF16 alone, any CPU without it)."""
    harvest_dtype: Literal["auto", "model", "bfloat16"] = "auto"
    """Precision of the LLM forwards that harvest the training activations: model = the model's own dtype; bfloat16 =
    autocast (matmuls in bf16, the residual stream and the recorded activations in float32); auto = bfloat16 where
    `fast_matmul`'s auto picks bf16 and the model runs in float32 (forwards 2.8x faster on an AMD EPYC with
    AVX512-BF16; docs/benchmarks.md), the model's dtype elsewhere. SAE quality is measured in the model's dtype."""
    mix: tuple[NonNegative, NonNegative, NonNegative] = (0.5, 0.25, 0.25)
    """Weights of WikiText / plain emotion text / task prompts."""
    seed: Seed = 0
    """Seed for initialisation, corpus order and shuffling."""
    max_memory_gb: float | None = Field(None, gt=0, exclude=True)
    """Memory for the SAEs trained at once (weights, gradients and Adam state: 16 bytes a parameter, plus each layer's
    shuffle buffer): layers are trained in groups that fit, each group sharing its LLM forwards, with the same result
    as all at once; unset: sized from the memory free on the SAEs' device when training starts (80% of it, less the
    trained SAEs and 1 GiB). Not part of the hash."""
    checkpoint_minutes: float = Field(10.0, gt=0, exclude=True)
    """Minutes between training checkpoints when training into a run directory: a killed run resumes from the last
    one with the same result. Not part of the hash."""


def _fast_dtype(choice: str, device) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs whose bf16 matmuls are fast (`fast_bf16_cpu`); float32 elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" or fast_bf16_cpu() else torch.float32
    return getattr(torch, choice)


def harvest_dtype(choice: str, view: Backend) -> torch.dtype:
    """The dtype the harvest forwards' matmuls run in (see SAETrainConfig.harvest_dtype)."""
    if choice == "auto":
        fast = _fast_dtype("auto", view.device) == torch.bfloat16
        return torch.bfloat16 if fast and view.dtype == torch.float32 else view.dtype
    return view.dtype if choice == "model" else getattr(torch, choice)


def fast_bf16_cpu(info: str | None = None) -> bool:
    """Whether this CPU runs bf16 matmuls faster than float32 (Linux: /proc/cpuinfo), as measured with
    bench/sae_train.py (docs/benchmarks.md): with AMX tiles; and on AMD with AVX512-BF16 (an `AMD EPYC`: an
    encoder-shaped matmul 7.7 ms in bf16 vs 31.6 ms, training 30,966 vs 17,904 tokens/s, the same FVU). Not on
    an Intel Xeon with AVX512-BF16 and no AMX, where bf16 trained slower (6,983 vs 10,075 tokens/s). `info`: the
    text of /proc/cpuinfo (read when not given)."""
    if info is None:
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            return False
    flags = next((ln.split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return "amx_bf16" in flags or ("AuthenticAMD" in info and "avx512_bf16" in flags)


def _batches(stream, per_forward: int, pool: int = 8):
    """Batches of sequences of similar length (sorted within a pool of `pool` batches) to cut padding."""
    while True:
        seqs = sorted((next(stream) for _ in range(per_forward * pool)), key=len)
        yield from (seqs[i:i + per_forward] for i in range(0, len(seqs), per_forward))


def _harvest(view: Backend, hooks: list[HookPoint], seqs: list[list[int]],
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One forward over a batch of sequences (autocast to `dtype` when it is not the model's); activations at every
    non-pad position after the first."""
    ids, mask = pad_batch(seqs, view.device)
    keep = mask.bool().clone()
    keep[:, 0] = False  # the first position (BOS) is an outlier the SAEs are not meant to explain
    cast = dtype not in (None, view.dtype)
    with torch.no_grad(), torch.autocast(view.device.type, dtype=dtype, enabled=cast), \
            record(view, hooks, stop=True) as acts:  # no block after the deepest hook runs
        view.model(input_ids=ids, attention_mask=mask, use_cache=False)
    out = {h.name: acts[h.name][keep].float() for h in hooks}
    if view.device.type == "cuda":  # the shuffle buffer lives in (pinned) CPU memory, not on the GPU
        out = {n: a.cpu().pin_memory() for n, a in out.items()}
    return out


class _Layer:
    """Training state of one layer's SAE (parameters in the training scale, Adam, dead counters)."""

    def __init__(self, cfg: SAETrainConfig, hp: HookPoint, d: int, scale: float, b_dec: torch.Tensor,
                 model_name: str, device):
        m = cfg.expansion * d
        self.hp, self.scale, self.k, self.model_name = hp, scale, cfg.k, model_name
        self.arch = cfg.architecture
        sae = SAE.init(SAEConfig(d_in=d, d_sae=m, k=cfg.k, hook_name=hp.name, model_name=model_name,
                                 architecture=cfg.architecture),
                       seed=cfg.seed * 1000 + hp.layer, b_dec=b_dec)
        self.W_enc_T = sae.W_enc.detach().T.contiguous().to(device).requires_grad_()
        self.b_enc = sae.b_enc.detach().clone().to(device).requires_grad_()
        self.W_dec = sae.W_dec.detach().clone().to(device).requires_grad_()
        self.b_dec = sae.b_dec.detach().clone().to(device).requires_grad_()
        # Gao et al. (2024): lr scaled by 1/sqrt(d_sae / 2^14)
        lr = cfg.lr / math.sqrt(max(m / 2**14, 1.0))
        params = [self.W_enc_T, self.b_enc, self.W_dec, self.b_dec]
        if self.arch == "jumprelu":  # threshold learned in log space
            self.log_threshold = torch.full((m,), math.log(cfg.threshold_init), device=device).requires_grad_()
            params.append(self.log_threshold)
        # the fused kernel: one pass over the parameters (10x the default's speed on a 2-core CPU, same
        # update up to float round-off)
        self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10,
                                    fused=torch.device(device).type in ("cpu", "cuda"))
        self.since_fired = torch.zeros(m, dtype=torch.long, device=device)
        self.stats = {"mse": [], "var": [], "l0": [], "aux": []}
        self.resampled = 0
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + hp.layer + 1)

    @torch.no_grad()
    def resample(self, x: torch.Tensor, cfg: SAETrainConfig, fast) -> None:
        """Bricken et al. (2023): point each dead latent at an input the SAE reconstructs badly.

        Inputs are drawn with probability proportional to their squared error; the latent's decoder row
        becomes the unit error direction, its encoder row that direction at 0.2 x the mean norm of the live
        encoder rows, its bias zero, and its Adam moments are cleared.
        """
        dead = (self.since_fired > cfg.dead_tokens).nonzero().squeeze(1)
        if len(dead) == 0:
            return
        idx, vals = _encode_topk(x - self.b_dec, self.W_enc_T.T, self.b_enc, cfg.k, fast)
        err = x - (_decode(idx, vals.relu(), self.W_dec) + self.b_dec)
        w = err.pow(2).sum(-1)
        n = min(len(dead), len(x))
        dead = dead[torch.randperm(len(dead), generator=self.gen, device=dead.device)[:n]]
        pick = torch.multinomial(w / w.sum(), n, replacement=False, generator=self.gen)
        direction = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(self.W_dec.shape[0], dtype=torch.bool, device=x.device)
        alive[dead] = False
        enc_norm = self.W_enc_T[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
        self.W_dec[dead] = direction
        self.W_enc_T[dead] = direction * enc_norm * 0.2  # Bricken et al.: 0.2 x the mean live norm
        self.b_enc[dead] = 0.0
        for param in (self.W_enc_T, self.W_dec, self.b_enc):
            st = self.opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][dead] = 0.0
        self.since_fired[dead] = 0
        self.resampled += n

    @profiling.timed("sae_train")
    def step(self, x: torch.Tensor, cfg: SAETrainConfig, fast) -> None:
        if self.arch == "topk":
            with torch.no_grad():
                dead = self.since_fired > cfg.dead_tokens
                out, g = topk_grads(x, self.W_enc_T.T, self.b_enc, self.W_dec, self.b_dec, cfg.k, dead,
                                    cfg.aux_k or 2 * cfg.k, cfg.aux_coef, fast)
                self.W_enc_T.grad, self.b_enc.grad, self.W_dec.grad, self.b_dec.grad = (
                    g["W_enc"].T.contiguous(), g["b_enc"], g["W_dec"], g["b_dec"])
            mse, l0, fired, aux = out.mse, out.l0, out.fired, out.aux
        else:
            from .dense_step import dense_loss
            self.opt.zero_grad(set_to_none=True)
            loss, mse, l0, fired = dense_loss(x, self.W_enc_T.T, self.b_enc, self.W_dec, self.b_dec, self.arch,
                                              getattr(self, "log_threshold", None), cfg.sparsity_coef, cfg.bandwidth)
            loss.backward()
            aux = torch.zeros(())
        var = float((x - x.mean(0)).pow(2).sum(-1).mean())
        if dist.world_size() > 1:
            mse, l0, fired, aux, var = self._all_reduce(mse, l0, fired, aux, var)
        with torch.no_grad():
            # keep decoder rows on the unit sphere: drop the gradient component along each row
            g_dec = self.W_dec.grad
            g_dec -= (g_dec * self.W_dec).sum(-1, keepdim=True) * self.W_dec
            self.opt.step()
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            self.since_fired += x.shape[0] * dist.world_size()
            self.since_fired[fired] = 0
            s = self.stats
            s["mse"].append(float(mse))
            s["var"].append(var)
            s["l0"].append(l0)
            s["aux"].append(float(aux))
        steps = len(self.stats["mse"])
        if (self.arch == "topk" and cfg.resample_every and steps % cfg.resample_every == 0
                and steps <= 0.7 * cfg.tokens / cfg.batch_tokens):
            self.resample(x, cfg, fast)
            if dist.world_size() > 1:  # every rank chose the same latents; rank 0's new directions hold
                for t in (self.W_enc_T, self.W_dec, self.b_enc):
                    torch.distributed.broadcast(t.data, 0)

    @torch.no_grad()
    def _all_reduce(self, mse, l0, fired, aux, var):
        """DDP: gradients averaged over ranks (each rank's batch is its share of the step's tokens, so the
        mean is the gradient of the whole step), latents fired on any rank, loss statistics averaged."""
        params = list(self.opt.param_groups[0]["params"])
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [
            fired.float(), torch.tensor([float(mse), l0, float(aux), var], device=fired.device)])
        dist.all_sum(flat)
        flat /= dist.world_size()
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
        m = len(fired)
        mse, l0, aux, var = flat[i + m:].tolist()
        return mse, l0, flat[i:i + m] > 0, aux, var

    def state(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (CPU tensors and plain values)."""
        names = ["W_enc_T", "b_enc", "W_dec", "b_dec"] + (["log_threshold"] if self.arch == "jumprelu" else [])
        return {"params": {n: getattr(self, n).detach().cpu() for n in names}, "opt": self.opt.state_dict(),
                "since_fired": self.since_fired.cpu(), "stats": self.stats, "resampled": self.resampled,
                "scale": self.scale, "gen": self.gen.get_state()}

    @classmethod
    def restore(cls, blob: dict, cfg: SAETrainConfig, hp: HookPoint, model_name: str, device) -> "_Layer":
        p = blob["params"]
        st = cls(cfg, hp, p["W_dec"].shape[1], blob["scale"], p["b_dec"], model_name, device)
        with torch.no_grad():
            for n, t in p.items():
                getattr(st, n).copy_(t)
        st.opt.load_state_dict(blob["opt"])
        st.since_fired = blob["since_fired"].to(device)
        st.stats, st.resampled = blob["stats"], blob["resampled"]
        st.gen.set_state(blob["gen"])
        return st

    def export(self, extra: dict) -> SAE:
        """Fold the training scale back in: features and thresholds in raw units, decoder unit-norm."""
        d, m = self.W_dec.shape[1], self.W_dec.shape[0]
        sae = SAE(SAEConfig(d_in=d, d_sae=m, k=self.k, hook_name=self.hp.name, model_name=self.model_name,
                            architecture=self.arch, extra=extra))
        with torch.no_grad():
            sae.W_enc.copy_(self.W_enc_T.T.cpu())
            sae.b_enc.copy_(self.b_enc.cpu() * self.scale)
            sae.W_dec.copy_(self.W_dec.cpu())
            sae.b_dec.copy_(self.b_dec.cpu() * self.scale)
            if self.arch == "jumprelu":
                sae.threshold.copy_(self.log_threshold.exp().cpu() * self.scale)
        return sae

    @classmethod
    def start(cls, cfg: SAETrainConfig, hp: HookPoint, x: torch.Tensor, model_name: str, device) -> "_Layer":
        """Training state for a layer, with the scale and b_dec taken from its first activations (of every
        rank: each holds an equal share)."""
        if dist.world_size() == 1:
            scale = float(x.pow(2).sum(-1).mean().sqrt() / math.sqrt(x.shape[1]))
            return cls(cfg, hp, x.shape[1], scale, (x / scale).mean(0).cpu(), model_name, device)
        stats = dist.all_sum(torch.cat([x.pow(2).sum(-1).mean()[None], x.mean(0)])) / dist.world_size()
        scale = float(stats[0].sqrt() / math.sqrt(x.shape[1]))
        return cls(cfg, hp, x.shape[1], scale, (stats[1:] / scale).cpu(), model_name, device)


def fit(x: torch.Tensor, cfg: SAETrainConfig, hook_name: str = "blocks.0.hook_resid_post", epochs: int = 1,
        model_name: str = "") -> tuple[SAE, dict]:
    """Train one SAE on activations already in memory [n, d] (tests, benchmarks, stored activations)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    st = _Layer.start(cfg, HookPoint.parse(hook_name), x, model_name, x.device)
    fast = _fast_dtype(cfg.fast_matmul, x.device)
    for _ in range(epochs):
        xs = x[torch.randperm(len(x), generator=gen)] / st.scale
        for i in range(0, len(xs) - cfg.batch_tokens + 1, cfg.batch_tokens):
            st.step(xs[i:i + cfg.batch_tokens], cfg, fast)
    return st.export({"tokens": len(x) * epochs, "seed": cfg.seed}), _layer_stats(st, cfg)


def _layer_stats(st: "_Layer", cfg: SAETrainConfig, last: int = 20) -> dict:
    s = st.stats
    fvu = sum(s["mse"][-last:]) / max(sum(s["var"][-last:]), 1e-12)
    return {"train_fvu_last": round(fvu, 4), "train_l0": round(sum(s["l0"][-last:]) / max(len(s["l0"][-last:]), 1), 2),
            "dead_frac_train": round(float((st.since_fired > cfg.dead_tokens).float().mean()), 4),
            "scale": st.scale, "steps": len(s["mse"]), "trained_tokens": len(s["mse"]) * cfg.batch_tokens,
            "resampled": st.resampled}


def layer_groups(hooks: list[HookPoint], d: int, cfg: SAETrainConfig, device=None) -> list[list[HookPoint]]:
    """Consecutive layers in groups whose training memory fits `max_memory_gb`, or when it is unset the memory
    available on `device` now (`memory_budget`)."""
    per_layer = _layer_bytes(d, cfg)
    budget = cfg.max_memory_gb * 2**30 if cfg.max_memory_gb is not None else memory_budget(len(hooks), d, cfg, device)
    size = max(1, int(budget // per_layer))
    return [hooks[i:i + size] for i in range(0, len(hooks), size)]


def _layer_bytes(d: int, cfg: SAETrainConfig) -> int:
    """One layer's training memory: weights, gradients and Adam state (16 bytes a parameter) and its shuffle buffer."""
    m = cfg.expansion * d
    return 16 * (2 * m * d + 2 * m + d) + 4 * cfg.buffer_tokens * d


def memory_budget(n_layers: int, d: int, cfg: SAETrainConfig, device=None) -> float:
    """Bytes the SAEs of one group may take in training: 80% of what is free on the device now (the model already
    loaded; MemAvailable on the CPU, shared by the ranks of a launcher), less the trained SAEs of every layer (kept
    in float32 until the stage ends) and 1 GiB for the harvest's activations and the quality passes."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available / dist.world_size()
    m = cfg.expansion * d
    kept = n_layers * 4 * (2 * m * d + m + d)
    return 0.8 * (free - kept - 2**30)


def train_layers(view: Backend, cfg: SAETrainConfig, data_dir=None, progress: Callable[[int], None] | None = None,
                 device=None, checkpoint_dir: Path | None = None) -> tuple[dict[str, SAE], dict]:
    """Train one SAE per requested layer, on `device` (default the model's): every layer of a group from one
    stream of LLM forwards (groups by `max_memory_gb`). With `checkpoint_dir`, training state is saved there
    every `checkpoint_minutes` and a rerun resumes from it. Returns the SAEs (on that device) and stats."""
    device = torch.device(device) if device is not None else view.device
    layers = cfg.layers if cfg.layers is not None else list(range(view.n_layers))
    if not layers:
        raise EmoscopeError("no layers to train SAEs for")
    hooks = [HookPoint(view.check_layer(layer), cfg.kind) for layer in layers]
    if cfg.k > cfg.expansion * view.d_model:
        raise EmoscopeError(f"saes.train.k = {cfg.k} is more than the {cfg.expansion * view.d_model} features of "
                            f"each SAE (expansion {cfg.expansion} x d_model {view.d_model})")
    t0, t_fwd, saes, per_layer = time.time(), 0.0, {}, {}
    groups = layer_groups(hooks, view.d_model, cfg, device)
    for group in groups:
        ckpt = checkpoint_dir / f"train-{group[0].layer}-{group[-1].layer}.pt" if checkpoint_dir else None
        states, seen, t = _train_group(view, cfg, group, data_dir, progress, device, ckpt)
        t_fwd += t
        for name, st in states.items():
            per_layer[name] = _layer_stats(st, cfg)
            saes[name] = st.export({"tokens": seen, "seed": cfg.seed, "k": cfg.k,
                                    "expansion": cfg.expansion}).to(device)
    wall = time.time() - t0
    stats = {"tokens": seen, "seconds": round(wall, 1), "forward_seconds": round(t_fwd, 1),
             "tokens_per_second": round(seen / wall, 1),
             "fast_matmul": str(_fast_dtype(cfg.fast_matmul, device)).replace("torch.", ""),
             "harvest_dtype": str(harvest_dtype(cfg.harvest_dtype, view)).replace("torch.", ""), "layers": per_layer}
    if len(groups) > 1:
        stats["groups"] = [[h.layer for h in g] for g in groups]
    return saes, stats


def _train_group(view: Backend, cfg: SAETrainConfig, hooks: list[HookPoint], data_dir, progress, device,
                 ckpt: Path | None) -> tuple[dict[str, "_Layer"], int, float]:
    """One stream of LLM forwards training every hook's SAE; resumes from `ckpt` when it holds this run's state.
    With several ranks (DDP), each harvests every world-size-th batch of the corpus into its own buffer and
    takes its share of each optimiser step's tokens; gradients are averaged over ranks at every step."""
    fast, harvest = _fast_dtype(cfg.fast_matmul, device), harvest_dtype(cfg.harvest_dtype, view)
    w = dist.world_size()
    if cfg.batch_tokens % w or cfg.buffer_tokens % w:
        raise EmoscopeError(f"saes.train.batch_tokens ({cfg.batch_tokens}) and buffer_tokens ({cfg.buffer_tokens}) "
                            f"must divide by the {w} ranks")
    torch.manual_seed(cfg.seed)
    batches = _batches(sequences(view, "train", cfg.context, cfg.seed, cfg.mix, data_dir), cfg.seqs_per_forward)
    batches = (b for i, b in enumerate(batches) if i % w == dist.rank())
    key = config_hash(cfg, view.name, [h.name for h in hooks], str(data_dir), w)
    t_fwd, seen, n_batches = 0.0, 0, 0
    states: dict[str, _Layer] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None and w > 1:
        ckpt = ckpt.with_name(f"{ckpt.stem}.rank{dist.rank()}{ckpt.suffix}")
    blob = _load_checkpoint(ckpt)
    if dist.all_min(int(blob is not None and blob.get("key") == key)) == 0:
        blob = None  # resume only when every rank can
    if blob is not None:
        seen, n_batches, t_fwd = blob["seen"], blob["n_batches"], blob["t_fwd"]
        gen.set_state(blob["gen"])
        torch.set_rng_state(blob["rng"])
        states = {h.name: _Layer.restore(blob["layers"][h.name], cfg, h, view.name, device) for h in hooks}
        for _ in range(n_batches):  # the corpus where it was: tokenising only, no forwards
            next(batches)
        if progress:
            progress(seen)
    last_save = time.time()
    buf: dict[str, list[torch.Tensor]] = {h.name: [] for h in hooks}
    n_buf, step_tokens = 0, cfg.batch_tokens // w
    while seen < cfg.tokens:
        t = time.time()
        acts = _harvest(view, hooks, next(batches), harvest)
        n_batches += 1
        t_fwd += time.time() - t
        n = next(iter(acts.values())).shape[0]
        for name, a in acts.items():
            buf[name].append(a)
        n_buf += n
        if n_buf < cfg.buffer_tokens // w and seen + n_buf * w < cfg.tokens:
            continue
        # every rank takes as many tokens as the smallest buffer holds, so all take the same steps
        take = min(dist.all_min(n_buf), -(-(cfg.tokens - seen) // w))
        perm = torch.randperm(n_buf, generator=gen)[:take]
        for h in hooks:
            x = torch.cat(buf[h.name])[perm].to(device, non_blocking=True)
            buf[h.name] = []
            if h.name not in states:  # first buffer: scale and b_dec init from data
                states[h.name] = _Layer.start(cfg, h, x, view.name, device)
            st = states[h.name]
            x = x / st.scale
            for i in range(0, take - step_tokens + 1, step_tokens):
                st.step(x[i:i + step_tokens], cfg, fast)
        seen += take * w
        n_buf = 0
        if progress:
            progress(take * w)
        if ckpt is not None and seen < cfg.tokens and dist.agree(time.time() - last_save > 60 * cfg.checkpoint_minutes):
            _save_checkpoint(ckpt, {"key": key, "seen": seen, "n_batches": n_batches, "t_fwd": t_fwd,
                                    "gen": gen.get_state(), "rng": torch.get_rng_state(),
                                    "layers": {n: st.state() for n, st in states.items()}})
            last_save = time.time()
    return states, seen, t_fwd


def _load_checkpoint(path: Path | None) -> dict | None:
    """A checkpoint written by _save_checkpoint; None when there is none or it cannot be read (start over)."""
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:  # truncated or foreign file: training restarts from the beginning, which is always correct
        return None
    return blob if isinstance(blob, dict) else None


def _save_checkpoint(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
