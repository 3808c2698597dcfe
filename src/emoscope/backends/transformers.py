"""The transformers backend: a Hugging Face causal LM with the handles hooks and logit reading need, whatever its
architecture (`ModelView`, made by `make_view`), and the model interface's operations computed in PyTorch.

Later stages need the same few handles on every architecture: the transformer blocks (to hook), the final norm and
the unembedding (to read logits from any residual). Every operation of `backends.base.OPERATIONS` is supported: label
scores with a shared-prefix KV cache (`task.score`), answer passes with SAE features clamped (`interventions`), and
any TransformerLens hook point read or edited with gradients (`hooks`). Loading is `models.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from pydantic import BaseModel
from torch import nn

from .. import profiling
from ..errors import EmoscopeError
from ..hooks import pad_batch
from ..interventions import answers, effects
from ..task import score
from .base import OPERATIONS



@dataclass
class ModelView:
    """A causal LM with the handles that hooks and logit reading need, whatever its architecture."""

    model: nn.Module
    tokenizer: object
    name: str
    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    chat: bool
    softcap: float | None = None
    path: str | None = None  # local directory the weights came from (the safetensors cache for GGUF)
    blocks_path: str = "model.layers"  # attribute path of the blocks (for tools that wrap the model)
    settings: BaseModel | None = None  # how it was loaded (None: built in memory, e.g. a test model)
    weights: str | None = None  # what the weights are, e.g. "Q4_K_M GGUF (x.gguf) dequantised, run in float32"

    supports = frozenset(OPERATIONS)  # every operation of the model interface (backends.base)
    backend = "transformers"

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device, or its execution device when accelerate dispatched the
        model (its weights may be offloaded to the CPU or disk and brought in for each forward)."""
        emb = self.model.get_input_embeddings()
        hook = getattr(emb, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            dev = hook.execution_device
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        return next(emb.parameters()).device

    @property
    def offloaded(self) -> bool:
        """Whether some weights live off their execution device (accelerate offload: meta placeholders here)."""
        return any(p.device.type == "meta" for p in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int:
        cfg = self.model.config.get_text_config()
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        return int(min(n, 1 << 15))

    @profiling.timed("llm_forward")
    def logits_from_resid(self, resid: torch.Tensor, tokens: list[int] | None = None) -> torch.Tensor:
        """Read a residual-stream vector through the final norm and unembedding (logit lens); with
        `tokens`, only those vocabulary entries (the unembedding of a large vocabulary is the most
        expensive step of a one-token pass)."""
        if tokens is None:
            logits = self.unembed(self.final_norm(resid))
        else:
            from accelerate.utils import align_module_device

            h = self.final_norm(resid)
            with align_module_device(self.unembed):  # offloaded weights brought in (a no-op otherwise)
                w = self.unembed.weight
                idx = torch.as_tensor(tokens, device=w.device)
                bias = None if getattr(self.unembed, "bias", None) is None else self.unembed.bias[idx]
                logits = torch.nn.functional.linear(h.to(w.device), w[idx], bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise EmoscopeError(f"layer {layer} out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return layer

    # ------------------------------------------------------------------ the model interface (backends.base.Backend)
    def score_ids(self, prompts: list[list[int]], labels: list[list[int]], batch_size: int = 8, progress=None,
                  resid_layers: list[int] = ()):
        """Summed label log-probs [n, K] (and answer-position residuals): `task.score.score_ids`."""
        return score.score_ids(self, prompts, labels, batch_size, progress, resid_layers)

    @torch.no_grad()
    def label_logits(self, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:
        """The logits of `tokens` at each prompt's answer position [n, K], the prompts in one padded batch."""
        ids, mask = pad_batch(prompts, self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return answers.answer_logits(self, ids, mask, last, tokens)[0]

    def ablate_each(self, saes: dict, prompts: list[list[int]], gold, tokens: list[int], sets: list[dict],
                    log_prior: torch.Tensor | None = None, baseline=None, kind: str = "best_other"):
        """Margins [len(sets), n] with each feature set clamped at the answer position: `effects.ablate_each`."""
        return effects.ablate_each(self, saes, prompts, gold, tokens, sets, log_prior, baseline, kind=kind)

    @torch.no_grad()
    def token_logits(self, ids: list[int]):
        """The next-token logits over the vocabulary at every position of one sequence [T, V], float32 numpy."""
        return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def check_tokens(self, prompts: list[str], ids: list[list[int]], labels: list[str],
                     label_ids: list[list[int]]) -> None:
        """Nothing to check: in transformers the token ids are this model's own tokenizer's (a file with another
        vocabulary is refused where it is loaded as a candidate)."""

    def describe(self) -> dict:
        """Nothing beyond `weights`, which names the file, its dequantisation and the dtype it runs in."""
        return {}


# Where the decoder blocks and final norm live, by architecture family.
_BLOCK_PATHS = ["model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "model.decoder.layers"]
_NORM_PATHS = ["model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm"]


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def make_view(model: nn.Module, tokenizer, name: str, chat: bool | None = None) -> ModelView:
    """Find blocks, final norm and unembedding on a loaded HF causal LM."""
    bpath = next((p for p in _BLOCK_PATHS if isinstance(_get(model, p), nn.ModuleList)), None)
    blocks = _get(model, bpath) if bpath else None
    norm = next((n for p in _NORM_PATHS if (n := _get(model, p)) is not None), None)
    unembed = model.get_output_embeddings()
    if blocks is None or norm is None or unembed is None:
        raise EmoscopeError(f"unsupported architecture {type(model).__name__}: cannot find blocks, final norm and "
                            "unembedding")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    profiling.instrument(model, [getattr(model, "base_model", model), unembed])
    return ModelView(model, tokenizer, name, blocks, norm, unembed, chat, softcap, str(path) if path else None, bpath)
