"""`load_saes`: SAEs from wherever they are — a run directory, a folder of SAELens-format folders (Gemma
Scope, Llama Scope, anything `sae_lens` saved), one SAE folder, a SAELens release id (online), or
SAE objects already in memory (emoscope's or `sae_lens.SAE`) — as a mapping hook name -> SAE, checked
against the model when one is given.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..errors import EmoscopeError
from ..hooks import HookPoint
from . import io
from .model import SAE


def load_saes(source, model=None, hooks: list[str] | None = None, ids: dict[str, str] | str | None = None,
              device: str | None = None) -> dict[str, SAE]:
    """hook name -> SAE, in layer order. `source`: a run directory (its `saes/`), a folder of SAE folders
    named by hook, one SAE folder, a SAELens release id, or a mapping hook -> SAE / `sae_lens.SAE`.
    For a release, `ids` is a mapping hook -> sae_id, a template such as `layer_{layer}/width_16k/canonical`
    (filled in for each of `hooks`), or `all` (every hook the release has one SAE for, found in SAELens's
    release directory). `hooks` picks some; `model` (a ModelView) checks width and layer range, and is
    where the SAEs go unless `device` says otherwise."""
    from ..models import resolve_device

    dev = resolve_device(device) if device else str(model.device) if model is not None else "cpu"
    if isinstance(source, dict):
        saes = {name: _convert(sae, name, dev) for name, sae in source.items()}
    elif Path(source).is_dir():
        saes = _from_folder(Path(source), hooks, dev)
    elif ids:
        ids = release_ids(str(source), ids, hooks)
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
    out, known = {}, _directory().get(release)
    for hook in hooks:
        try:
            lens = LensSAE.from_pretrained(release, ids[hook], device="cpu")
        except Exception as e:  # offline, unknown release or id
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EmoscopeError(f"cannot load SAELens release {release} / {ids[hook]}: {why}") from None
        out[hook] = _convert(lens[0] if isinstance(lens, tuple) else lens, hook, device)
        out[hook].cfg.hook_name = hook  # e.g. blocks.L.hook_resid_pre is read here as blocks.(L-1).hook_resid_post
        np_id = (known.neuronpedia_id or {}).get(ids[hook]) if known else None  # its public dashboard
        out[hook].cfg.extra = {**out[hook].cfg.extra, "release": release, "sae_id": ids[hook],
                               **({"neuronpedia_id": np_id} if np_id else {})}
    return out


# Hook names from the sae_ids of the suites in SAELens's directory: Gemma Scope (layer_12/width_16k/...,
# kind from the release name), Llama Scope (l12r_8x: r residual, m MLP, a attention output), and
# TransformerLens-named ids (blocks.12.hook_resid_post; resid_pre of block L is resid_post of L - 1).
_GEMMA_KIND = {"res": "resid_post", "mlp": "mlp_out"}
_LLAMA_KIND = {"r": "resid_post", "m": "mlp_out", "a": "attn_out"}


def hook_of(release: str, sae_id: str) -> str | None:
    """The emoscope hook an SAE of a release reads, or None where emoscope has no such hook."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|attn_out|mlp_out)", sae_id):
        layer, kind = int(m.group(1)), m.group(2)
        if kind == "resid_pre":
            return HookPoint(layer - 1).name if layer > 0 else None
        return HookPoint(layer, kind).name
    if m := re.match(r"layer_(\d+)/", sae_id):
        kind = next((v for k, v in _GEMMA_KIND.items() if f"-{k}" in release), None)
        return HookPoint(int(m.group(1)), kind).name if kind else None
    if m := re.fullmatch(r"l(\d+)([rma])_\w+", sae_id):
        return HookPoint(int(m.group(1)), _LLAMA_KIND[m.group(2)]).name
    return None


def _directory() -> dict:
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return {}
    return get_pretrained_saes_directory()


def release_ids(release: str, ids: dict[str, str] | str, hooks: list[str] | None) -> dict[str, str]:
    """hook -> sae_id for a release, from a mapping (as given), a template with {layer}, or `all`."""
    if isinstance(ids, dict):
        return ids
    if ids != "all":
        if "{layer}" not in ids:
            raise EmoscopeError(f"pretrained_ids '{ids}' must be a mapping hook -> sae_id, 'all', or a template "
                                "with {layer}, e.g. layer_{layer}/width_16k/canonical")
        if hooks is None:
            raise EmoscopeError("an sae_id template needs the hooks (layers) to fill it in for")
        out = {h: ids.replace("{layer}", str(HookPoint.parse(h).layer)) for h in hooks}
        known = _directory().get(release)
        unknown = [i for i in out.values() if known is not None and i not in known.saes_map]
        if unknown:
            raise EmoscopeError(f"release {release} has no SAE {unknown[0]} (from the template '{ids}')")
        return out
    known = _directory().get(release)
    if known is None:
        raise EmoscopeError(f"'{release}' is not in SAELens's release directory (installed sae_lens): give "
                            "pretrained_ids as a template or a mapping hook -> sae_id")
    found: dict[str, list[str]] = {}
    for sae_id in known.saes_map:
        hook = hook_of(release, sae_id)
        if hook is not None and (hooks is None or hook in hooks):
            found.setdefault(hook, []).append(sae_id)
    several = {h: v for h, v in found.items() if len(v) > 1}
    if several:
        h, v = next(iter(several.items()))
        example = re.sub(r"(?<=layer_)\d+|(?<=^l)\d+", "{layer}", v[0])
        raise EmoscopeError(f"release {release} has {len(v)} SAEs for {h} ({', '.join(v[:3])}): choose one per "
                            f"layer with an sae_id template, e.g. pretrained_ids: '{example}'")
    if not found:
        raise EmoscopeError(f"release {release} has no SAE for the requested hooks")
    return {h: v[0] for h, v in sorted(found.items(), key=lambda kv: HookPoint.parse(kv[0]).layer)}
