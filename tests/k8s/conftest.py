"""Fixtures for the offline Kubernetes manifest tests: the rendered overlays, once per session."""

from __future__ import annotations

import pytest

from devtools.k8s import manifests


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = manifests.find_kubectl()
    if path is None:
        pytest.skip(manifests.KUBECTL_HINT)
    return path


_CACHE: dict[str, list[manifests.Obj]] = {}


@pytest.fixture(scope="session")
def render(kubectl: str):  # type: ignore[no-untyped-def]
    """render(overlay) -> the overlay's objects (kustomize output), rendered once per session."""

    def _render(overlay: str) -> list[manifests.Obj]:
        if overlay not in _CACHE:
            _CACHE[overlay] = manifests.render(overlay, kubectl)
        return _CACHE[overlay]

    return _render


@pytest.fixture(params=manifests.OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(render, overlay: str) -> list[manifests.Obj]:  # type: ignore[no-untyped-def]
    """The overlay's rendered objects."""
    return render(overlay)


@pytest.fixture
def objects(docs: list[manifests.Obj]) -> list[manifests.Obj]:
    """Rendered objects plus the ones carried as data (the RLHF RayJob template)."""
    return docs + manifests.embedded_objects(docs)
