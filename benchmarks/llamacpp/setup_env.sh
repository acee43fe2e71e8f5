#!/usr/bin/env bash
# Build llama-cpp-python from PyPI once into its own environment (idempotent; used by `make test-llamacpp`).
# One compile job, niced: the machine has 2 cores. The project's .venv is not touched; the check runs llama.cpp in a
# worker process of this environment (benchmarks/llamacpp/worker.py).
set -euo pipefail
VENV="${1:-.venv-llamacpp}"
PINS=(llama-cpp-python==0.3.36 numpy gguf==0.19.0)
STAMP="$VENV/.llamacpp-installed"
# llava/mtmd (multimodal) is not needed; the CPU backend only.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]} $CMAKE_ARGS" ]; then
    exit 0
fi
PYTHON="${PYTHON:-python3}"
echo "building llama-cpp-python into $VENV (once; 15-40 min with one compile job)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
nice -n 10 "$VENV/bin/python" -m pip install -q "${PINS[@]}"
"$VENV/bin/python" -c "import llama_cpp, gguf, numpy; print('llama-cpp-python', llama_cpp.__version__)"
echo "${PINS[*]} $CMAKE_ARGS" > "$STAMP"
