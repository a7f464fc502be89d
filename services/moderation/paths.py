"""Where moderation finds its files: weights in the cache (never in the repo), data in the repo.

Kept free of heavy imports: the serving path imports this, the build and training commands too.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
POLICY_FILE = PACKAGE_DIR / "policy.yaml"
CLASSIFIER_FILE = DATA_DIR / "classifier.npz"
# The prompt service's hidden instructions (output moderation checks answers for them).
TEMPLATES_FILE = PACKAGE_DIR.parent / "prompt" / "templates.yaml"

EMBEDDER_NAME = "all-MiniLM-L6-v2"


def cache_root() -> Path:
    """``$COLLOQUY_CACHE`` or ``~/.cache/colloquy`` (the same root the model build uses)."""
    value = os.environ.get("COLLOQUY_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "colloquy"


def model_dir() -> Path:
    """The exported embedding model: ``model.onnx``, ``tokenizer.json``, ``manifest.json``."""
    return cache_root() / "moderation" / "minilm-l6-v2-onnx"
