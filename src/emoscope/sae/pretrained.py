"""`load_saes`: SAEs from wherever they are — a run directory, a folder of SAELens-format folders (Gemma
Scope, Llama Scope, anything `sae_lens` saved), one SAE folder, a SAELens release id (online), or
SAE objects already in memory (emoscope's or `sae_lens.SAE`) — as a mapping hook name -> SAE, checked
against the model when one is given.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import EmoscopeError
from ..hooks import HookPoint
from . import io
from .model import SAE


def load_saes(source, model=None, hooks: list[str] | None = None, ids: dict[str, str] | None = None,
              device: str | None = None) -> dict[str, SAE]:
    """hook name -> SAE, in layer order. `source`: a run directory (its `saes/`), a folder of SAE folders
    named by hook, one SAE folder, a SAELens release id (with `ids`: hook -> sae_id), or a mapping hook ->
    SAE / `sae_lens.SAE`. `hooks` picks some; `model` (a ModelView) checks width and layer range, and
    is where the SAEs go unless `device` says otherwise."""
    dev = device or (str(model.device) if model is not None else "cpu")
    if isinstance(source, dict):
        saes = {name: _convert(sae, name, dev) for name, sae in source.items()}
    elif Path(source).is_dir():
        saes = _from_folder(Path(source), hooks, dev)
    elif ids:
        saes = _from_release(str(source), ids, hooks or list(ids), dev)
    else:
        raise EmoscopeError(f"SAE folder not found: {source} (for a SAELens release, also give ids: hook -> sae_id)")
    if hooks is not None:
        missing = [h for h in hooks if h not in saes]
        if missing:
            raise EmoscopeError(f"no SAE for {', '.join(missing)} in {source}")
        saes = {h: saes[h] for h in hooks}
    if model is not None:
        for name, sae in saes.items():
            io.check_against(sae, model, name)
    return dict(sorted(saes.items(), key=lambda kv: (HookPoint.parse(kv[0]).layer, kv[0])))


def _from_folder(root: Path, hooks: list[str] | None, device: str) -> dict[str, SAE]:
    if (root / "saes").is_dir():  # a run directory
        root = root / "saes"
    if (root / io.CFG).is_file():  # one SAE folder
        sae = io.load(root, device)
        return {sae.cfg.hook_name or root.name: sae}
    listed = root / "result.json"
    if hooks is None and listed.is_file():  # a saes stage folder lists its hooks in order
        try:
            hooks = json.loads(listed.read_text())["hooks"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EmoscopeError(f"{listed} is not a saes stage result") from None
    names = hooks or sorted(p.name for p in root.iterdir() if (p / io.CFG).is_file())
    if not names:
        raise EmoscopeError(f"{root} holds no SAE folders (each needs {io.CFG} and {io.WEIGHTS})")
    out = {}
    for name in names:
        if not (root / name).is_dir():
            raise EmoscopeError(f"no SAE for {name} in {root} (expected a folder {name})")
        out[name] = io.load(root / name, device)
    return out


def _convert(sae, name: str, device: str) -> SAE:
    """An emoscope SAE as it is; a `sae_lens.SAE` through its own on-disk format."""
    if isinstance(sae, SAE):
        return sae.to(device)
    if not hasattr(sae, "save_model"):
        raise EmoscopeError(f"SAE for {name} is a {type(sae).__name__}: expected an emoscope or sae_lens SAE")
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(Path(tmp) / "sae")
        out = io.load(Path(tmp) / "sae", device)
    out.cfg.hook_name = out.cfg.hook_name or name
    return out


def _from_release(release: str, ids: dict[str, str], hooks: list[str], device: str) -> dict[str, SAE]:
    """SAELens release SAEs (needs sae_lens and a network), through SAELens's own loader."""
    try:
        from sae_lens import SAE as LensSAE
    except ImportError:
        raise EmoscopeError(f"'{release}' is not a folder; loading a SAELens release needs "
                            "`pip install emoscope[interop]`") from None
    missing = [h for h in hooks if h not in ids]
    if missing:
        raise EmoscopeError(f"release {release}: give pretrained_ids for {', '.join(missing)} (hook -> sae_id)")
    out = {}
    for hook in hooks:
        try:
            lens = LensSAE.from_pretrained(release, ids[hook], device="cpu")
        except Exception as e:  # offline, unknown release or id
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EmoscopeError(f"cannot load SAELens release {release} / {ids[hook]}: {why}") from None
        out[hook] = _convert(lens[0] if isinstance(lens, tuple) else lens, hook, device)
    return out
