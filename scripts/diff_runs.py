"""Compare the result files of two run directories leaf by leaf, to show that a change (a speed-up, a
new library version) leaves results equal or to list and bound what differs.

Per stage: how many JSON leaves (every number, string and flag of result.json) are identical, how many
numbers differ and the largest absolute difference, and every leaf that differs by more than --tol or
is not a number (a changed prediction, verdict or choice). Parquet tables: rows, columns and the
largest numeric difference. Wall-clock files (timing.json) and config hashes are skipped.

Usage: python scripts/diff_runs.py RUN_A RUN_B [--stages phases,trace] [--tol 1e-3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

STAGES = ("evaluate", "saes", "phases", "trace", "steer", "audit")


def leaves(x, path: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff_json(a: dict, b: dict, tol: float) -> dict:
    """Identical leaves, numeric differences (count, largest and where), and leaves beyond `tol`."""
    A, B = dict(leaves(a)), dict(leaves(b))
    out = {"leaves": len(set(A) | set(B)), "identical": 0, "numeric_differ": 0, "max_abs": 0.0, "max_at": None,
           "beyond_tol": []}
    for k in sorted(set(A) | set(B)):
        if k.endswith("config_hash") or k.endswith("run_dir"):
            out["identical"] += 1
            continue
        x, y = A.get(k, "<missing>"), B.get(k, "<missing>")
        if x == y or (_number(x) and _number(y) and math.isnan(x) and math.isnan(y)):
            out["identical"] += 1
        elif _number(x) and _number(y):
            out["numeric_differ"] += 1
            d = abs(x - y)
            if d > out["max_abs"]:
                out["max_abs"], out["max_at"] = d, k
            if d > tol:
                out["beyond_tol"].append([k, x, y])
        else:
            out["beyond_tol"].append([k, x, y])
    return out


def diff_table(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"shape_a": list(a.shape), "shape_b": list(b.shape), "same_shape": False}
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c])]
    other = [c for c in a.columns if c not in num]
    d = max((float(np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)))) for c in num), default=0.0)
    changed = sum(int((a[c].astype(str) != b[c].astype(str)).sum()) for c in other)
    return {"rows": len(a), "same_shape": True, "max_abs": d, "non_numeric_cells_changed": changed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    report = {}
    for st in a.stages.split(","):
        fa, fb = a.a / st / "result.json", a.b / st / "result.json"
        if not (fa.is_file() and fb.is_file()):
            continue
        r = diff_json(json.loads(fa.read_text()), json.loads(fb.read_text()), a.tol)
        r["tables"] = {p.stem: diff_table(pd.read_parquet(p), pd.read_parquet(a.b / st / p.name))
                       for p in sorted((a.a / st).glob("*.parquet")) if (a.b / st / p.name).is_file()}
        report[st] = r
        print(f"{st}: {r['leaves']} leaves, {r['identical']} identical, {r['numeric_differ']} numbers differ (largest "
              f"{r['max_abs']:.2e} at {r['max_at']}), {len(r['beyond_tol'])} beyond {a.tol:g} or not numbers")
        for k, x, y in r["beyond_tol"][:20]:
            print(f"    {k}: {x!r} -> {y!r}")
        for name, t in r["tables"].items():
            print(f"    table {name}: {t}")
    if not report:
        print(f"error: no stage result found in both {a.a} and {a.b}", file=sys.stderr)
        sys.exit(2)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
