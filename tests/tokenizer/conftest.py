"""Fixtures: the real SmolLM2 tokenizer (files and the loaded domain object)."""

from __future__ import annotations



