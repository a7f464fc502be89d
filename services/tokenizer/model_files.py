"""Where the served model's tokenizer files are, and what its context length is.

The tokenizer must be byte-for-byte the one the generation deployment serves, so by default it is
read from the model registry's current version of the "generation" deployment; `TOKENIZER_PATH`
pins a directory instead (tests, direct-use deployments with the files baked into the image).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from services.common.config import ConfigError

log = logging.getLogger(__name__)

DEPLOYMENT = "generation"
TOKENIZER_FILE = "tokenizer.json"
GENAI_CONFIG = "genai_config.json"
DEFAULT_CONTEXT_TOKENS = 8192


def resolve_tokenizer_dir(configured: str, deployment: str = DEPLOYMENT) -> Path:
    """The directory holding tokenizer.json: `configured` if set, else the registry's current version.

    Raises ConfigError with what was tried, so a service stops before serving a wrong tokenizer.
    """
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            path = path.parent
        if not (path / TOKENIZER_FILE).is_file():
            raise ConfigError(f"TOKENIZER_PATH={configured!r} has no {TOKENIZER_FILE}")
        return path
    found = registry_version_dir(deployment)
    if found is None:
        raise ConfigError(f"TOKENIZER_PATH is not set and the model registry has no current "
                          f"{deployment!r} version with a {TOKENIZER_FILE}: build the model "
                          f"(make model) or set TOKENIZER_PATH to a directory with {TOKENIZER_FILE}")
    return found


def registry_version_dir(deployment: str = DEPLOYMENT) -> Path | None:
    """The registry's current version directory of `deployment`, if it has a tokenizer.json.

    Only the manifest is checked (cheap): the generation deployment verifies checksums when it
    loads the model, and a half-published version never has a manifest.
    """
    from model.registry import Registry, RegistryError

    reg = Registry()
    try:
        version = reg.current(deployment)
        if version is None:
            return None
        reg.manifest(version)
    except RegistryError as exc:
        log.warning("the model registry has no usable current version",
                    extra={"deployment": deployment, "error": str(exc)})
        return None
    path = reg.version_path(version)
    return path if (path / TOKENIZER_FILE).is_file() else None


def context_tokens(model_dir: Path, configured: int = 0) -> int:
    """The model's context length: `configured` if > 0, else genai_config.json's, else 8192."""
    if configured > 0:
        return configured
    try:
        doc: dict[str, Any] = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))
        value = int(doc["model"]["context_length"])
    except FileNotFoundError:
        return DEFAULT_CONTEXT_TOKENS
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{model_dir / GENAI_CONFIG} has no valid model.context_length ({exc})") from None
    if value <= 0:
        raise ConfigError(f"{model_dir / GENAI_CONFIG}: model.context_length={value} must be > 0")
    return value
