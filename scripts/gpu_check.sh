#!/usr/bin/env bash
# The prepared GPU check (issue #29): one call of at most 8 minutes on an H100/H200, from the repository root.
#   1. pytest -m gpu (tests/test_gpu.py: the pipeline on CUDA against the CPU on a tiny model, devices kept);
#   2. the quick pipeline (make demo's config) on CUDA on the embedded model, where its package is installed,
#      compared with a CPU run of the same config ($CPU_RUN, e.g. a carried runs/demo) by scripts/diff_runs.py;
#   3. bench/scale.py --device cuda on the random-weight Gemma-2-2B-shaped model;
#   4. bench/sae_train.py --device cuda on that model's activations (SAELens too where it is installed).
# Figures and logs go to $OUT (default gpu-check/): gpu_check.json (every step's exit code, seconds and note,
# the machine), gpu_check.log, scale.json, sae_train.json, quick_diff.json. Steps that need CUDA are skipped,
# and recorded as such, where there is none; the exit code is 1 if a step that ran failed, else 0.
# Inputs: $GPU (default .gpu/, made by scripts/gpu_wheels.sh: wheels installed with --no-deps, data, tokenizer);
# PY (default python3); STEP_S (per-step limits, seconds, default "90 150 150 60": 7 min 30 s in all).
set -uo pipefail
OUT=${OUT:-gpu-check}
GPU=${GPU:-.gpu}
PY=${PY:-python3}
read -r T_PYTEST T_QUICK T_SCALE T_SAE <<< "${STEP_S:-90 150 150 60}"
WORK=$(mktemp -d /tmp/emoscope-gpu-check.XXXXXX)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS="$WORK/steps.tsv"
: > "$LOG"
: > "$STEPS"

if compgen -G "$GPU/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$GPU"/wheels/*.whl >> "$LOG" 2>&1 || { echo "error: installing $GPU/wheels failed (see $LOG)" >&2; exit 2; }
    export PYTHONPATH="$WORK/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d "$GPU/data" ] && export EMOSCOPE_DATA="$PWD/$GPU/data"
TOKENIZER=()
[ -d "$GPU/tokenizer" ] && TOKENIZER=(--tokenizer "$GPU/tokenizer")
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# step NAME LIMIT_S CMD...: run it with a time limit, its output appended to the log; record rc and seconds
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "== $name: $*" >> "$LOG"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" \
        "$([ $rc -eq 124 ] && echo "stopped at its ${limit} s limit")" >> "$STEPS"
}
skip() { printf '%s\tnull\t0\t%s\n' "$1" "skipped: $2" >> "$STEPS"; echo "== $1: skipped: $2" >> "$LOG"; }

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>> "$LOG" || echo 0)
step pytest_gpu "$T_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
if [ "$CUDA" != 1 ]; then
    for s in quick_cuda scale_cuda sae_train_cuda; do skip $s "no CUDA device"; done
else
    if "$PY" -c "from emoscope.models import REGISTRY; REGISTRY['gemma3-270m'].gguf()" >> "$LOG" 2>&1; then
        step quick_cuda "$T_QUICK" "$PY" -m emoscope.cli run --config quick --set "run_dir=$WORK/quick" \
            --set model.device=cuda
        if [ -n "${CPU_RUN:-}" ]; then
            "$PY" scripts/diff_runs.py "$CPU_RUN" "$WORK/quick" --json "$OUT/quick_diff.json" >> "$LOG" 2>&1
        fi
        cp "$WORK/quick/run.log" "$OUT/quick_run.log" 2>/dev/null
    else
        skip quick_cuda "the embedded model's package is not installed (245 MB: more than a 64 MiB carry)"
    fi
    step scale_cuda "$T_SCALE" "$PY" bench/scale.py --sizes 2b --device cuda "${TOKENIZER[@]}" --out "$WORK/scale" \
        --keep --json "$OUT/scale.json"
    if [ -d "$WORK/scale/2b/model" ]; then
        step sae_train_cuda "$T_SAE" "$PY" bench/sae_train.py --model "$WORK/scale/2b/model" --device cuda \
            --json "$OUT/sae_train.json"
    else
        skip sae_train_cuda "no Gemma-2-2B-shaped model (the scale step did not build one)"
    fi
fi

"$PY" - "$STEPS" "$OUT/gpu_check.json" <<'EOF'
import json, os, platform, sys
import torch
steps = []
for line in open(sys.argv[1]):
    name, rc, secs, note = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": None if rc == "null" else int(rc), "seconds": round(int(secs) / 1000, 1),
                  "note": note})
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
summary = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_cores": os.cpu_count(), "steps": steps,
           "failed": [s["step"] for s in steps if s["rc"] not in (None, 0)]}
open(sys.argv[2], "w").write(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(1 if summary["failed"] else 0)
EOF
rc=$?
rm -rf "$WORK"
exit $rc
