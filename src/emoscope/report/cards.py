"""`export_cards(run_dir)`: the run's feature cards as files other tools read, in `run_dir/cards/`.

- `cards.json`: every card the phases and trace stages wrote (`sae.cards`), keyed `hook/feature`, each
  with its traced ablation effects (emotion, phase, effect with 95% interval) added;
- `<hook>.json`: one SAEDashboard Neuronpedia batch per SAE (`sae.cards.neuronpedia_batch`), named after
  the SAE's public Neuronpedia source when it came from a release that has one.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_dir, read_json, write_json
from ..sae.cards import neuronpedia_batch


def traced_effects(tr: dict | None) -> dict[tuple[int, int], list[dict]]:
    """(layer, feature) -> its exact ablation effects in a trace result: emotion, phase (0-based), effect."""
    out: dict[tuple[int, int], list] = {}
    for lab, e in ((tr or {}).get("emotions") or {}).items():
        for p, r in e["phases"].items():
            for f in r["features"]:
                out.setdefault((f["layer"], f["feature"]), []).append({"emotion": lab, "phase": int(p), **f["effect"]})
    return out


def export_cards(run_dir: str | Path) -> Path | None:
    """Write `run_dir/cards/` (replaced whole) from the phases and trace results; None when no stage
    wrote cards."""
    run_dir = Path(run_dir)
    res = {s: read_json(run_dir / s / "result.json") for s in ("evaluate", "saes", "phases", "trace")
           if (run_dir / s / "result.json").is_file()}
    cards = {**(res.get("phases", {}).get("cards") or {}), **(res.get("trace", {}).get("cards") or {})}
    if not cards:
        return None
    effects = traced_effects(res.get("trace"))
    ev = res.get("evaluate", {})
    model = (ev.get("model") or {}).get("name", "")
    dataset = str((ev.get("config") or {}).get("data", {}).get("dataset", ""))
    public = res.get("saes", {}).get("neuronpedia") or {}
    by_hook: dict[str, list] = {}
    for c in cards.values():
        by_hook.setdefault(c["hook"], []).append(c)
    out = run_dir / "cards"
    with atomic_dir(out) as tmp:
        write_json(tmp / "cards.json", {k: {**c, "effects": effects.get((c["layer"], c["feature"]), [])}
                                        for k, c in sorted(cards.items())})
        for hook, cs in by_hook.items():
            model_id, sae_set = public[hook].split("/", 1) if hook in public else (Path(model).name, f"emoscope-{hook}")
            write_json(tmp / f"{hook}.json", neuronpedia_batch(cs, model_id, cs[0]["layer"], sae_set, dataset))
    return out
