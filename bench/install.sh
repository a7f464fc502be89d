#!/usr/bin/env bash
# Install the `bench` extra (requirements/bench.lock) into .venv for `make bench`; idempotent.
# llama-cpp-python has no manylinux wheel: uv builds it from source with cmake (CPU only, ~5-10 min on
# 2 cores) and keeps the built wheel in its cache. If that build fails, everything else is installed
# and the engine benchmark skips llama.cpp with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
lock=requirements/bench.lock
stamp=.venv/.colloquy-bench-lock.sha256
# `make setup` re-syncs .venv to dev.lock when its stamp changes; then this must install again.
want=$(cat "$lock" .venv/.colloquy-lock.sha256 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
export VIRTUAL_ENV=$PWD/.venv
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "bench: installing $lock (llama-cpp-python builds from source the first time: minutes)"
if uv pip install --quiet -r "$lock"; then
  echo "$want" > "$stamp"
else
  echo "bench: WARNING: installing $lock failed (llama-cpp-python build?); installing the rest," \
       "the engine benchmark will skip llama.cpp" >&2
  grep -v '^llama-cpp-python==' "$lock" > /tmp/colloquy-bench-nollama.lock
  uv pip install --quiet -r /tmp/colloquy-bench-nollama.lock || true
fi
exit 0
