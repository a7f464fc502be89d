"""Fixtures for the generation tests: the tiny random model (real tokenizer, real ORT GenAI)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def serve_running(env: dict[str, str], overrides: dict[str, Any], grpc_port: int | None = None) -> Iterator[None]:
    """Ray Serve running serve_config.yaml's generation app with `overrides`; `env` is set before
    ray.init (Serve's build task and the replicas inherit it) and restored after the shutdown."""
    from devtools.procs import free_port
    from services.generation import serving
    from services.generation.config import DEFAULT_SERVE_CONFIG

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cfg = serving.load_config(DEFAULT_SERVE_CONFIG, grpc_port=grpc_port or free_port(), http_port=free_port(),
                                  deployment_overrides=overrides)
        serving.init_ray(num_cpus=2, object_store_mb=200)
        try:
            serving.deploy(cfg, timeout_s=600)
            yield
        finally:
            serving.shutdown_ray()
