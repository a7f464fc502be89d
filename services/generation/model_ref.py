"""Which model directory and version label a replica serves.

An explicit directory wins (tests, images with the model baked in); otherwise the model registry's
current version of the "generation" deployment. The version label travels with every answer, so
it must name what was really loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from services.common.config import ConfigError

log = logging.getLogger(__name__)

DEPLOYMENT = "generation"
GENAI_CONFIG = "genai_config.json"


def _registry() -> Any | None:
    try:
        from model import registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return registry


def resolve(model_dir: str = "", version: str = "", deployment: str = DEPLOYMENT) -> tuple[Path, str]:
    """(directory with genai_config.json, version label); ConfigError says what was tried."""
    if model_dir:
        path = Path(model_dir).expanduser()
        if not (path / GENAI_CONFIG).is_file():
            raise ConfigError(f"GENERATION_MODEL_DIR={model_dir!r} has no {GENAI_CONFIG}")
        return path, version or path.name
    reg = _registry()
    if reg is None:
        raise ConfigError("GENERATION_MODEL_DIR is not set and the model registry package is missing")
    try:
        found = _from_registry(reg, version, deployment)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"GENERATION_MODEL_DIR is not set and the model registry has no "
                          f"{'version ' + repr(version) if version else 'current version'} of "
                          f"{deployment!r}: build the model (make model) ({exc})") from None
    return found


def _from_registry(reg: Any, version: str, deployment: str) -> tuple[Path, str]:
    """The registry's version (checksums verified before ONNX Runtime reads a byte)."""
    r = reg.Registry()
    label = version or r.current(deployment)
    if not label:
        raise ConfigError(f"GENERATION_MODEL_DIR is not set and the model registry at {r.root} has no "
                          f"current {deployment!r} version: build the model (make model)")
    loaded = r.load(label, verify=True)
    if not (Path(loaded.path) / GENAI_CONFIG).is_file():
        raise ConfigError(f"registry version {label!r} at {loaded.path} has no {GENAI_CONFIG}")
    return Path(loaded.path), label
