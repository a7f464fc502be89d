"""The engine's one settings class and the one way a Serve replica gets it (no Ray started).

`EngineSettings` names each knob once (engine, scheduler, deployment and worker read its fields),
holds values built in code to the bounds its variables have, and reaches replicas only as the
init argument `deployment.build` binds from the environment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from services.common.config import ConfigError, load
from services.generation import deployment
from services.generation.config import EngineSettings

GENERATION = Path(deployment.__file__).parent
FIELDS = {f.name for f in dataclasses.fields(EngineSettings)}


@pytest.mark.parametrize(("field", "value", "var"), [
    ("max_running", 0, "GENERATION_MAX_RUNNING"),
    ("slot_tokens", 0, "GENERATION_SLOT_TOKENS"),
    ("provider", "tpu", "GENERATION_PROVIDER"),
    ("prefix_cache_min_tokens", 0, "GENERATION_PREFIX_CACHE_MIN_TOKENS"),
    ("stream_messages_per_s", 0.5, "GENERATION_STREAM_MESSAGES_PER_S"),
    ("stream_messages_per_s", -1.0, "GENERATION_STREAM_MESSAGES_PER_S"),
])
def test_a_value_set_in_code_is_checked_like_its_variable(field: str, value: object, var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        EngineSettings(**{field: value})
    with pytest.raises(ConfigError, match=var):
        load(EngineSettings, {var: str(value)})


def test_code_only_knobs_are_checked() -> None:
    with pytest.raises(ValueError, match="prefix_cache_block"):
        EngineSettings(prefix_cache_block=0)


def _config_attrs(path: Path) -> set[str]:
    """Attributes read from the engine's settings in `path`: `config.X`, `self.config.X`,
    `settings.X`, `self.settings.X`."""
    names = {"config", "settings"}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name in names:
                out.add(node.attr)
    return out


@pytest.mark.parametrize("module", ["engine.py", "scheduler.py", "deployment.py"])
def test_the_engine_reads_knobs_only_under_their_settings_names(module: str) -> None:
    """No second name for a knob: whatever engine, scheduler and deployment read from their
    settings is a field of EngineSettings (a renamed copy would have to be a new attribute)."""
    read = _config_attrs(GENERATION / module) - {"load", "ConfigError", "exit_config_error", "load_or_exit"}
    assert read, f"{module} reads no settings: the scan is wrong"
    assert read <= FIELDS, f"{module} reads {sorted(read - FIELDS)}, which EngineSettings does not declare"


def test_replicas_get_their_settings_only_from_build() -> None:
    """The replica's constructor takes the settings (no default, so nothing falls back to reading
    the environment inside a replica); the builder reads the environment once."""
    params = inspect.signature(deployment.Generation.func_or_class.__init__).parameters
    assert list(params) == ["self", "settings"]
    assert params["settings"].default is inspect.Parameter.empty
    got = deployment.settings_for({}, {"GENERATION_MAX_RUNNING": "3", "GENERATION_STREAM_INTERVAL_MS": "50"})
    assert got == EngineSettings(max_running=3, stream_interval_ms=50.0)
    with pytest.raises(ConfigError, match="GENERATION_MAX_RUNNING"):
        deployment.settings_for({}, {"GENERATION_MAX_RUNNING": "0"})


def test_the_application_takes_no_args() -> None:
    """One way in: a Serve config `args` entry would be a second channel for a knob."""
    with pytest.raises(ConfigError, match=r"takes no args \(got \['model_dir'\]\).*GENERATION_"):
        deployment.settings_for({"model_dir": "/models/x"}, {})
