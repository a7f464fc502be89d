#!/usr/bin/env bash
# One-time (and idempotent) setup of everything Colloquy needs on a fresh Debian machine:
# system packages (Java 17, Maven), the Python environment from the lock file, generated
# protobuf code. Big downloads are cached outside the repo (uv cache, ~/.m2, ~/.cache/colloquy).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash scripts/bootstrap-system.sh

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv (pinned) with pip"
  python3 -m pip install --quiet "uv==0.13.9"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv (Python 3.11)"
  uv venv --quiet --python 3.11 .venv
fi

# Sync only when the lock changed since the last sync: a warm setup costs nothing.
lock=requirements/dev.lock
stamp=.venv/.colloquy-lock.sha256
want=$(sha256sum "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies from $lock"
  VIRTUAL_ENV=$PWD/.venv uv pip sync --quiet "$lock"
  VIRTUAL_ENV=$PWD/.venv uv pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi

# Generated protobuf code lives in build/python (never committed); a .pth file puts it on the path.
make --no-print-directory protos
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/build/python" > "$site/colloquy-generated.pth"

echo "setup: done in $(( $(date +%s) - start ))s"
