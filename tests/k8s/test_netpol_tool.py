"""cyclonus, an independent offline NetworkPolicy engine, agrees with devtools/k8s/connectivity.py.

Skipped where cyclonus is not installed (`bash scripts/k8s-netpol-check.sh` installs the pinned
version into .venv/bin with `go install`); tests/k8s/test_connectivity.py is the check that always runs.
"""

from __future__ import annotations

import pytest

from devtools.k8s import netpol_tool, sync
from devtools.k8s.manifests import Obj


@pytest.fixture(scope="session")
def cyclonus() -> str:
    path = netpol_tool.find_cyclonus()
    if path is None:
        pytest.skip(netpol_tool.HINT)
    return path


def test_cyclonus_allows_every_dialed_flow_and_agrees_with_our_checker(cyclonus: str, objects: list[Obj]) -> None:
    problems, qs = netpol_tool.disagreements(cyclonus, objects)
    assert not problems, "\n".join(problems)
    # The controls are not all allowed: cyclonus read the policies rather than defaulting to open.
    assert any(q.dialed for q in qs) and any(not q.expected for q in qs)


def test_cyclonus_denies_the_gateway_health_watch_without_its_egress(cyclonus: str, objects: list[Obj]) -> None:
    """The issue-16 manifests (no dials-gateway policy) fail this second check too."""
    old = [o for o in objects if not (o["kind"] == "NetworkPolicy"
                                      and o["metadata"]["name"] == f"{sync.DIALS_PREFIX}gateway")]
    assert len(old) == len(objects) - 1
    problems, _ = netpol_tool.disagreements(cyclonus, old)
    assert problems == ["dialed but denied by cyclonus: StatefulSet/gateway -> Service/moderation port 50053",
                        "dialed but denied by cyclonus: StatefulSet/gateway -> Service/postgres port 5432"]


def test_install_script_pins_the_version_the_hint_names() -> None:
    script = (sync.ROOT / "scripts" / "k8s-netpol-check.sh").read_text(encoding="utf-8")
    assert f"VERSION={netpol_tool.CYCLONUS_VERSION}\n" in script
    assert netpol_tool.CYCLONUS_MODULE in script
