"""Where the model pipeline keeps its files.

Everything lives under one cache root so CI can cache a single directory and a
developer can wipe it with one ``rm -rf``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$COLLOQUY_CACHE`` or ``~/.cache/colloquy``: the root of all caches."""
    value = os.environ.get("COLLOQUY_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "colloquy"


def downloads_dir() -> Path:
    """Downloaded artifacts (the model wheel), reused across builds."""
    return cache_root() / "downloads"


def build_dir() -> Path:
    """Intermediate and final build outputs, each with a stamp."""
    return cache_root() / "build"


def registry_root() -> Path:
    """``$COLLOQUY_MODEL_REGISTRY`` or ``<cache>/registry``: the model registry."""
    value = os.environ.get("COLLOQUY_MODEL_REGISTRY")
    return Path(value).expanduser() if value else cache_root() / "registry"
