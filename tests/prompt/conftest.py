"""Fixtures: the real SmolLM2 tokenizer and the shipped prompt templates."""

from __future__ import annotations

import pytest

from services.prompt import templates
from services.prompt.config import DEFAULT_TEMPLATES


@pytest.fixture(scope="session")
def shipped() -> templates.TemplateSet:
    return templates.load_file(DEFAULT_TEMPLATES)
