"""Fixtures: the real SmolLM2 tokenizer and the shipped prompt templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.prompt import templates
from services.prompt.config import DEFAULT_TEMPLATES
from services.tokenizer.domain import TextTokenizer
from tests.tokenizer.files import tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return tokenizer_dir()


@pytest.fixture(scope="session")
def tok(tokenizer_path: Path) -> TextTokenizer:
    return TextTokenizer.from_file(str(tokenizer_path / "tokenizer.json"))


@pytest.fixture(scope="session")
def shipped() -> templates.TemplateSet:
    return templates.load_file(DEFAULT_TEMPLATES)
