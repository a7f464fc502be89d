"""The real SmolLM2 tokenizer files for tests.

Order: `TOKENIZER_PATH`, the model registry's current "generation" version, then the model
build's own cached tokenizer step (`model.tiny.tokenizer_dir`: converted from the pinned GGUF once,
then reused). Tests never use a stand-in tokenizer: prompt lengths must be the model's.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.tokenizer import model_files


def tokenizer_dir() -> Path:
    configured = os.environ.get("TOKENIZER_PATH", "")
    if configured:
        return model_files.resolve_tokenizer_dir(configured)
    found = model_files.registry_version_dir()
    if found is not None:
        return found
    from model.tiny import tokenizer_dir as build_tokenizer_dir

    return build_tokenizer_dir()
