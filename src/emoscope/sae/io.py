"""SAEs on disk in the SAELens layout: one folder per hook with `cfg.json` + `sae_weights.safetensors`.

emoscope's SAEs load in SAELens (`SAE.load_from_disk`), and SAELens-format SAEs (Gemma Scope, Llama
Scope, anything saved by `sae_lens`) load here. Loading checks the SAE against the model: width,
hook point and layer range; a mismatch is a one-line error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import profiling
from ..errors import EmoscopeError
from .model import SAE, SAEConfig

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
_TO_SAELENS = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}
_FROM_SAELENS = {v: k for k, v in _TO_SAELENS.items()}


@profiling.timed("io")
def save(sae: SAE, path: str | Path) -> Path:
    """Write the SAE folder atomically (temporary folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    cfg = {
        "architecture": _TO_SAELENS[c.architecture], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": c.normalize,
        "reshape_activations": "none",
        # sae_lens_version marks the v6 config layout (metadata block), which is what this writes
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": c.hook_name, "model_name": c.model_name,
                     "emoscope": c.extra},
    }
    if c.architecture == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS)
    (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


@profiling.timed("io")
def load(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    if not (path / CFG).is_file() or not (path / WEIGHTS).is_file():
        raise EmoscopeError(f"{path} is not an SAE folder: it needs {CFG} and {WEIGHTS}")
    try:
        raw = json.loads((path / CFG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmoscopeError(f"{path / CFG} is not valid JSON ({getattr(e, 'msg', None) or e.reason})") from None
    if not isinstance(raw, dict):
        raise EmoscopeError(f"{path / CFG} must hold a JSON object, not a {type(raw).__name__}")
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise EmoscopeError(f"{path / CFG}: '{key}' must be a positive integer, found {raw.get(key)!r}")
    try:
        tensors = load_file(str(path / WEIGHTS), device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise EmoscopeError(f"{path / WEIGHTS} is unreadable or truncated ({str(e).splitlines()[0]})") from None
    arch = _FROM_SAELENS.get(raw.get("architecture", "standard"))
    if arch is None:
        raise EmoscopeError(f"{path}: SAE architecture '{raw.get('architecture')}' is not supported (topk, jumprelu, "
                            "standard)")
    normalize = raw.get("normalize_activations") or "none"
    if normalize not in ("none", "constant_norm_rescale", "layer_norm"):
        # expected_average_only_in needs a dataset-wide factor that the folder does not hold: SAELens folds
        # it into the weights when it loads the release (load those through the release id instead)
        raise EmoscopeError(f"{path}: normalize_activations='{normalize}' is not supported here (none, "
                            "constant_norm_rescale, layer_norm); load the SAE by its SAELens release id instead")
    meta = raw.get("metadata") or {}
    cfg = SAEConfig(
        d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=arch, k=int(raw.get("k", 32)),
        hook_name=meta.get("hook_name", raw.get("hook_name", "")), model_name=meta.get("model_name",
                                                                                       raw.get("model_name", "")),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), normalize=normalize,
        extra={**({"neuronpedia_id": meta["neuronpedia_id"]} if meta.get("neuronpedia_id") else {}),
               **meta.get("emoscope", {})},
    )
    sae = SAE(cfg)
    want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items() if k in want}
    if got != want:
        raise EmoscopeError(f"{path}: weights do not match cfg.json (expected {want}, found {got})")
    sae.load_state_dict({k: tensors[k].float() for k in want})
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        sae.normalize_decoder()
    return sae.to(device)


def check_against(sae: SAE, view, hook_name: str | None = None) -> None:
    """Refuse an SAE that cannot read this model's activations at this hook."""
    from ..hooks import HookPoint

    name = hook_name or sae.cfg.hook_name
    hp = HookPoint.parse(name)
    view.check_layer(hp.layer)
    if sae.cfg.d_in != view.d_model:
        raise EmoscopeError(f"SAE for {sae.cfg.hook_name or name} has d_in={sae.cfg.d_in} but {view.name} has "
                            f"d_model={view.d_model}")
    if hook_name and sae.cfg.hook_name and sae.cfg.hook_name != hook_name:
        raise EmoscopeError(f"SAE was trained on {sae.cfg.hook_name}, not {hook_name}")
