"""Alert rules: promtool's own unit tests (fire when they should, quiet when they should)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # scripts/bootstrap-system.sh installs Debian's prometheus
        pytest.fail("promtool not installed: run `make setup`")
    return path


def test_rules_and_config_are_valid(promtool: str) -> None:
    subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], check=True, capture_output=True)
    subprocess.run([promtool, "check", "config", str(PROM / "prometheus.yml")], check=True, capture_output=True)


def test_alert_unit_tests_pass(promtool: str) -> None:
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
