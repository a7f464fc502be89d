"""Fixtures for the model tests: the tiny model (always) and the real build (when present).

Tests that need the real SmolLM2 build skip with a reason naming the command
that makes it, and never build it themselves (that takes minutes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model.paths import build_dir
from model.registry import ModelVersion, Registry

BUILD_HINT = "real model build absent: run `python -m model.build` (make model) first"


@pytest.fixture(scope="session", autouse=True)
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny random model (built on first use, ~30 s mostly importing torch)."""
    from model.tiny import cached_tiny_model

    return cached_tiny_model()


@pytest.fixture(scope="session")
def hf_fp32_dir() -> Path:
    """The float32 Hugging Face checkpoint of the real model."""
    path = build_dir() / "hf-fp32"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{BUILD_HINT} ({path} missing)")
    return path


@pytest.fixture(scope="session")
def onnx_fp32_dir() -> Path:
    """The float32 CPU ONNX build of the real model."""
    path = build_dir() / "onnx" / "cpu-fp32"
    if not (path / "model.onnx").is_file():
        pytest.skip(f"{BUILD_HINT} ({path} missing)")
    return path


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The registry the build publishes into ($COLLOQUY_MODEL_REGISTRY or the cache's)."""
    return Registry()


@pytest.fixture(scope="session")
def served_version(registry: Registry) -> ModelVersion:
    """The build's served default, loaded and checksum-verified.

    Taken from the build's ``report.json`` when it names a published version,
    else from the ``generation`` pointer if that points at a real (not tiny)
    build: an operator may have moved the pointer, or a test registry may
    point it at the tiny model.
    """
    from model.source import SOURCE_ID

    version = None
    report = build_dir() / "report.json"
    if report.is_file():
        version = json.loads(report.read_text(encoding="utf-8")).get("served_default_version")
    if not version or not registry.exists(version):
        current = registry.current("generation")
        if current and registry.manifest(current)["source"] == SOURCE_ID:
            version = current
    if not version or not registry.exists(version):
        pytest.skip(f"{BUILD_HINT} (no served default in {registry.root})")
    return registry.load(version)
