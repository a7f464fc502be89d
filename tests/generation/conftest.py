"""Fixtures for the generation tests: the tiny random model (real tokenizer, real ORT GenAI)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny model, built on first use (about a minute).

    An existing build is used as it is: checking its stamp imports torch and transformers, which
    costs most of a minute on this machine; `python -m model.tiny` refreshes it.
    """
    from model.paths import build_dir

    cached = build_dir() / "tiny"
    if (cached / "genai_config.json").is_file() and (cached / "tokenizer.json").is_file():
        return cached
    from model.tiny import cached_tiny_model

    return Path(cached_tiny_model())


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The registry's current generation model; tests using it are marked `model`."""
    from services.common.config import ConfigError
    from services.generation import model_ref

    try:
        path, _ = model_ref.resolve()
    except ConfigError as exc:
        pytest.skip(f"no real model build: {exc}")
    return path
