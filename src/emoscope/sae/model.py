"""SAE architectures behind one class: TopK (default), JumpReLU, ReLU (+L1 when training).

Conventions follow SAELens so that saved SAEs load there unchanged: W_enc [d_in, d_sae],
W_dec [d_sae, d_in] with unit-norm rows (one decoder direction per feature), b_enc, b_dec, and the
decoder bias subtracted from the input before encoding (apply_b_dec_to_input).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn

from .. import profiling

ARCHITECTURES = ("topk", "jumprelu", "relu")


@dataclass
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads (the model's d_model)."""
    d_sae: int
    """Number of features (d_in times the expansion factor)."""
    architecture: Literal["topk", "jumprelu", "relu"] = "topk"
    """Sparsity mechanism: keep the k largest, a learned per-feature threshold, or plain ReLU."""
    k: int = 32
    """Active features per token (TopK only)."""
    hook_name: str = ""
    """Hook point the SAE reads, e.g. blocks.6.hook_resid_post."""
    model_name: str = ""
    """Model the SAE was trained on (checked when loading against a model)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (False in e.g. Gemma Scope)."""
    normalize: Literal["none", "constant_norm_rescale", "layer_norm"] = "none"
    """Input normalisation (SAELens `normalize_activations`): each token is normalised before encoding and the
    reconstruction mapped back, so feature edits act in the SAE's space and are rescaled into the residual."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (training tokens, seed, corpus) saved into cfg.json metadata."""

    def to_dict(self) -> dict:
        return asdict(self)


class SAEOutput(NamedTuple):
    recon: torch.Tensor
    """Reconstruction of the input, [..., d_in]."""
    feats: torch.Tensor
    """Feature activations, dense with zeros, [..., d_sae]."""
    pre: torch.Tensor
    """Pre-activations (before the sparsity mechanism), [..., d_sae]."""


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            from ..errors import EmoscopeError
            raise EmoscopeError(f"unknown SAE architecture '{cfg.architecture}': choose {', '.join(ARCHITECTURES)}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    @classmethod
    def init(cls, cfg: SAEConfig, seed: int = 0, b_dec: torch.Tensor | None = None) -> "SAE":
        """Random unit-norm decoder rows, encoder = decoder transposed (Gao et al., 2024), b_dec from data."""
        sae = cls(cfg)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        with torch.no_grad():
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            if b_dec is not None:
                sae.b_dec.copy_(b_dec)
            if cfg.architecture == "jumprelu":
                sae.threshold.fill_(1e-3)
        return sae

    def norm_stats(self, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Per-token (shift, scale): the reconstruction in the SAE's space maps back to the residual as
        recon * scale + shift; (0, 1) without normalisation. As SAELens computes them (layer_norm divides the
        input by std + 1e-5 but multiplies the output by std)."""
        if self.cfg.normalize == "constant_norm_rescale":
            return 0.0, x.norm(dim=-1, keepdim=True) / self.cfg.d_in ** 0.5
        if self.cfg.normalize == "layer_norm":
            return x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        return 0.0, 1.0

    def out_scale(self, x: torch.Tensor) -> torch.Tensor | float:
        """What a change of the reconstruction in the SAE's space is multiplied by in the residual."""
        return self.norm_stats(x)[1]

    def _normalized(self, x: torch.Tensor):
        """The input on the SAE's device and dtype, normalised, with its (shift, scale)."""
        x = x.to(self.W_enc.device, self.W_enc.dtype)  # activations from any device / dtype (no-op when equal)
        if self.cfg.normalize == "none":
            return x, 0.0, 1.0
        shift, scale = self.norm_stats(x)
        return (x - shift) / (scale + 1e-5 if self.cfg.normalize == "layer_norm" else scale), shift, scale

    def pre_acts(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        if not normalized:
            x = self._normalized(x)[0]
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        acts = pre.relu()
        if arch == "jumprelu":
            acts = acts * (pre > self.threshold)
        return acts

    @profiling.timed("sae")
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    @profiling.timed("sae")
    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.W_dec + self.b_dec

    @profiling.timed("sae")
    def forward(self, x: torch.Tensor) -> SAEOutput:
        xn, shift, scale = self._normalized(x)
        pre = self.pre_acts(xn, normalized=True)
        feats = self.activate(pre)
        recon = self.decode(feats)
        return SAEOutput(recon * scale + shift if self.cfg.normalize != "none" else recon, feats, pre)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm, moving their norm into the encoder (same outputs)."""
        norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.div_(norm)
        self.W_enc.mul_(norm.T)
        self.b_enc.mul_(norm[:, 0])
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(norm[:, 0])
