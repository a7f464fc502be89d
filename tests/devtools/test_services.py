"""The one service table (devtools/services.py) against the services' own defaults and its readers."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devtools import services
from devtools.services import BY_NAME, SERVICES

ROOT = Path(__file__).resolve().parents[2]


def _config_defaults(module: str) -> dict[str, str]:
    """A service's DEFAULTS (its own GRPC_PORT/METRICS_PORT), from config.py or __main__.py."""
    for part in ("config", "__main__"):
        try:
            mod = importlib.import_module(f"{module}.{part}")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "DEFAULTS"):
            return dict(mod.DEFAULTS)
    return {}


@pytest.mark.parametrize("svc", [s for s in SERVICES if not s.http], ids=lambda s: s.name)
def test_table_ports_are_the_services_own_defaults(svc: services.Service) -> None:
    defaults = _config_defaults(svc.module)
    assert defaults.get("METRICS_PORT") == str(svc.metrics_port), (svc.name, defaults)
    if svc.name == "generation":  # its gRPC port is the Serve config's grpc_options.port
        serve = yaml.safe_load((ROOT / "services/generation/serve_config.yaml").read_text(encoding="utf-8"))
        assert serve["grpc_options"]["port"] == svc.port
    else:
        assert defaults.get("GRPC_PORT") == str(svc.port), (svc.name, defaults)


def test_http_service_port_is_its_configs_default() -> None:
    from services.web.config import WebConfig

    assert WebConfig.__dataclass_fields__["port"].default == BY_NAME["web"].port


def test_every_table_module_is_a_runnable_service() -> None:
    for svc in SERVICES:
        assert (ROOT / svc.module.replace(".", "/") / "__main__.py").is_file(), svc.module


def test_a_moved_port_moves_the_service_and_its_peers_addresses() -> None:
    env = {"MODERATION_PORT": "61000", "GATEWAY_PORT": "61001"}
    assert services.local_wiring("gateway", env) == {
        "GRPC_PORT": "61001", "METRICS_PORT": "9101", "MODERATION_ADDR": "127.0.0.1:61000"}
    assert services.local_wiring("web", env) == {
        "WEB_PORT": "8080", "METRICS_PORT": "9108", "GATEWAY_ADDR": "127.0.0.1:61001",
        "MODERATION_ADDR": "127.0.0.1:61000"}
    assert services.local_wiring("generation", {})["GENERATION_GRPC_PORT"] == "9000"


def test_cli_prints_the_table_stack_sh_reads() -> None:
    out = subprocess.run([sys.executable, "-m", "devtools.services", "table"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    rows = [line.split() for line in out.splitlines()]
    assert [r[0] for r in rows] == services.ORDER
    assert rows[0][0] == "generation"  # starts first and alone (Ray)
    assert {r[0]: r[4] for r in rows}["web"] == "http"
    bad = subprocess.run([sys.executable, "-m", "devtools.services", "env", "nope"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_stack_sh_status_lists_every_service_of_the_table(tmp_path: Path) -> None:
    out = subprocess.run(["bash", "scripts/stack.sh", "status"], cwd=ROOT, check=True, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "COLLOQUY_VAR": str(tmp_path)}).stdout
    assert [line.split(":")[0] for line in out.splitlines()] == services.ORDER
