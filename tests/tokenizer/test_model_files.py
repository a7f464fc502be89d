"""Finding the served model's tokenizer: TOKENIZER_PATH, else the registry's current version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.registry import Registry
from services.common.config import ConfigError
from services.tokenizer import model_files


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("COLLOQUY_MODEL_REGISTRY", str(tmp_path / "registry"))
    return Registry()


def publish(reg: Registry, tokenizer_path: Path, tmp_path: Path, version: str, context: int) -> Path:
    src = tmp_path / f"src-{version}"
    src.mkdir()
    shutil.copy(tokenizer_path / "tokenizer.json", src / "tokenizer.json")
    (src / "genai_config.json").write_text(json.dumps({"model": {"context_length": context}}))
    reg.publish(src, version, source="test", precision="fp32", execution_provider="cpu")
    return reg.version_path(version)


def test_default_is_the_registrys_current_generation_version(
        registry: Registry, tokenizer_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no current 'generation' version"):
        model_files.resolve_tokenizer_dir("")
    v1 = publish(registry, tokenizer_path, tmp_path, "v1", 4096)
    v2 = publish(registry, tokenizer_path, tmp_path, "v2", 2048)
    registry.set_current("generation", "v1")
    assert model_files.resolve_tokenizer_dir("") == v1
    assert model_files.context_tokens(v1) == 4096
    registry.set_current("generation", "v2")
    assert model_files.resolve_tokenizer_dir("") == v2
    assert model_files.context_tokens(v2) == 2048
    assert model_files.context_tokens(v2, configured=512) == 512, "MODEL_CONTEXT_TOKENS wins"


def test_tokenizer_path_pins_a_directory_or_file(tokenizer_path: Path, tmp_path: Path) -> None:
    assert model_files.resolve_tokenizer_dir(str(tokenizer_path)) == tokenizer_path
    assert model_files.resolve_tokenizer_dir(str(tokenizer_path / "tokenizer.json")) == tokenizer_path
    with pytest.raises(ConfigError, match=r"has no tokenizer\.json"):
        model_files.resolve_tokenizer_dir(str(tmp_path))


def test_context_length_defaults_and_errors(tmp_path: Path) -> None:
    assert model_files.context_tokens(tmp_path) == 8192
    (tmp_path / "genai_config.json").write_text('{"model": {}}')
    with pytest.raises(ConfigError, match=r"no valid model\.context_length"):
        model_files.context_tokens(tmp_path)
