"""Fixtures: the real SmolLM2 tokenizer (files and the loaded domain object)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tokenizer.domain import TextTokenizer
from tests.tokenizer.files import tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return tokenizer_dir()


@pytest.fixture(scope="session")
def tok(tokenizer_path: Path) -> TextTokenizer:
    return TextTokenizer.from_file(str(tokenizer_path / "tokenizer.json"))
