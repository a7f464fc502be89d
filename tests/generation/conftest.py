"""Fixtures for the generation tests: the tiny random model (real tokenizer, real ORT GenAI)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny model (built on first use, about a minute; then instant)."""
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
