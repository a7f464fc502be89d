#!/usr/bin/env bash
# Install the `bench` extra (requirements/bench.lock) into .venv for `make bench`, and build
# llama.cpp's server (bench/build_llama_server.sh, cached in ~/.cache/colloquy/llama.cpp); idempotent.
# llama-cpp-python is left out: no benchmark uses it any more (the llama.cpp contender is the server,
# which batches; llama-cpp-python generates one sequence at a time) and it has no manylinux wheel,
# so it cost a 5-10 minute source build. If a step fails, the rest still installs and the engine
# benchmark skips what is missing, with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
lock=requirements/bench.lock
stamp=.venv/.colloquy-bench-lock.sha256
# `make setup` re-syncs .venv to dev.lock when its stamp changes; then this must install again.
want=$(cat "$lock" .venv/.colloquy-lock.sha256 bench/install.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export VIRTUAL_ENV=$PWD/.venv
  echo "bench: installing $lock (without llama-cpp-python)"
  grep -v '^llama-cpp-python==' "$lock" > "${TMPDIR:-/tmp}/colloquy-bench-nollama.lock"
  if uv pip install --quiet -r "${TMPDIR:-/tmp}/colloquy-bench-nollama.lock"; then
    echo "$want" > "$stamp"
  else
    echo "bench: WARNING: installing $lock failed; benchmarks needing it skip with the reason" >&2
  fi
fi
if ! bash bench/build_llama_server.sh --path >/dev/null; then
  echo "bench: building llama.cpp's server for the engine benchmark (once; ~5 minutes on 2 cores)"
  bash bench/build_llama_server.sh >/dev/null \
    || echo "bench: WARNING: llama-server did not build; the engine benchmark skips llama.cpp" >&2
fi
exit 0
