"""Run ONNX Runtime GenAI's model builder on a Hugging Face checkpoint.

The builder writes ``model.onnx`` (+ external data) and ``genai_config.json``
with a KV cache. Its own copies of the tokenizer files are replaced with ours
afterwards, so every build of every precision ships byte-identical tokenizer
files (the builder re-saves them through whatever transformers is installed).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from model.hf_export import TOKENIZER_FILES, copy_tokenizer


class BuilderError(RuntimeError):
    """The ONNX Runtime GenAI builder failed; the message carries its log tail."""


def builder_args(hf_dir: Path, out_dir: Path, precision: str, execution_provider: str,
                 cache_dir: Path, extra_options: Mapping[str, str]) -> list[str]:
    """The builder's command-line arguments (the build log records the full command)."""
    args = ["-i", str(hf_dir), "-o", str(out_dir), "-p", precision,
            "-e", execution_provider, "-c", str(cache_dir)]
    if extra_options:
        args += ["--extra_options", *(f"{k}={v}" for k, v in sorted(extra_options.items()))]
    return args


# The builder stamps ``producer_version`` with ``git rev-parse HEAD`` run five
# directories above its own file: for a venv inside a git checkout that is the
# *checkout's* commit, so every commit of this repo would change model.onnx.
# Pointing git at no repository makes it fall back to the wheel's own commit.
_NO_GIT = {"GIT_DIR": os.devnull, "GIT_CEILING_DIRECTORIES": "/"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_NO_GIT)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_builder(hf_dir: Path, out_dir: Path, precision: str, execution_provider: str,
                extra_options: Mapping[str, str] | None = None, log_path: Path | None = None,
                in_process: bool = False) -> None:
    """Export ``hf_dir`` to ``out_dir`` and put our tokenizer files next to the model.

    A subprocess (default) keeps the builder's memory and chatter out of the
    caller; ``in_process`` skips re-importing torch, which matters for the
    tiny test model that should build in seconds.
    """
    extra = dict(extra_options or {})
    with tempfile.TemporaryDirectory(prefix="ortgenai-cache-") as cache:
        args = builder_args(hf_dir, out_dir, precision, execution_provider, Path(cache), extra)
        if in_process:
            _run_in_process(args, log_path)
        else:
            _run_subprocess(args, log_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)
    missing = [n for n in TOKENIZER_FILES if not (hf_dir / n).exists()]
    if missing:
        raise BuilderError(f"{hf_dir} lacks tokenizer files {missing}")
    copy_tokenizer(hf_dir, out_dir)
    if not (out_dir / "model.onnx").exists() or not (out_dir / "genai_config.json").exists():
        raise BuilderError(f"builder wrote no model.onnx/genai_config.json in {out_dir}")


def _run_subprocess(args: list[str], log_path: Path | None) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    output = proc.stdout + proc.stderr
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(" ".join(cmd) + "\n" + output, encoding="utf-8")
    if proc.returncode != 0:
        raise BuilderError(f"builder failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")


def _run_in_process(args: list[str], log_path: Path | None) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from onnxruntime_genai.models import builder

    argv = sys.argv
    saved = {k: os.environ.get(k) for k in _NO_GIT}
    os.environ.update(_NO_GIT)
    sink = open(log_path, "w", encoding="utf-8") if log_path else open(os.devnull, "w")  # noqa: SIM115
    try:
        sys.argv = ["builder", *args]
        with sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            parsed = builder.get_args()
            extra = builder.parse_extra_options(
                parsed.model_name, parsed.input, parsed.output, parsed.precision,
                parsed.execution_provider, parsed.cache_dir, parsed.extra_options)
            builder.create_model(parsed.model_name, parsed.input, parsed.output,
                                 parsed.precision, parsed.execution_provider,
                                 parsed.cache_dir, **extra)
    except Exception as exc:  # the builder raises many types; one error type for callers
        raise BuilderError(f"builder failed: {exc}") from exc
    finally:
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
