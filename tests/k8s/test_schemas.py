"""Every rendered object is valid, strictly, for Kubernetes and for the operators' CRDs."""

from __future__ import annotations

import copy

import pytest

from devtools.k8s import manifests
from devtools.k8s.manifests import Obj
from tests.k8s import schemas


@pytest.fixture(scope="module", autouse=True)
def _crds_present() -> None:
    if not schemas.CRD_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {schemas.CRD_DIR} (set COLLOQUY_K8S_CRDS)")
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: bash scripts/k8s-tools.sh")


@pytest.mark.parametrize("version", schemas.K8S_VERSIONS)
def test_every_object_validates_strictly(objects: list[Obj], version: str) -> None:
    problems = []
    for obj in objects:
        try:
            errors = schemas.validate(obj, version)
        except schemas.NoSchema as exc:
            errors = [str(exc)]
        problems.extend(f"{manifests.ident(obj)}: {e}" for e in errors)
    assert not problems, "\n".join(problems)


def test_custom_resources_use_the_served_api_versions(objects: list[Obj]) -> None:
    # Strimzi 1.x serves only kafka.strimzi.io/v1 (v1beta2 is gone); KubeRay and the Prometheus
    # Operator serve v1. Every custom resource must be one the shared CRDs know.
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if group in {"kafka.strimzi.io", "ray.io", "monitoring.coreos.com"}:
            crd = schemas.crds()[(group, obj["kind"])]
            assert obj["apiVersion"].endswith("/v1") and "v1" in crd.served, manifests.ident(obj)


def test_the_validators_are_strict(render) -> None:  # type: ignore[no-untyped-def]
    """Guards the guard: unknown fields, wrong types and unserved versions are caught."""
    docs = render("dev")
    topic = next(d for d in docs if d["kind"] == "KafkaTopic")
    typo = copy.deepcopy(topic)
    typo["spec"]["partiton"] = 3
    assert any("partiton" in e for e in schemas.validate(typo))
    old = copy.deepcopy(topic)
    old["apiVersion"] = "kafka.strimzi.io/v1beta2"
    with pytest.raises(schemas.NoSchema):
        schemas.validate(old)
    rs = copy.deepcopy(next(d for d in docs if d["kind"] == "RayService"))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert any("resourcez" in e for e in schemas.validate(rs))
    sts = copy.deepcopy(next(d for d in docs if d["kind"] == "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    assert schemas.validate(sts)  # gRPC probes take a number, not a port name
    sts["metadata"]["labelz"] = {}
    assert any("labelz" in e for e in schemas.validate(sts))


def test_crd_conversion_rules() -> None:
    crd = {"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "maybe": {"type": "string", "nullable": True},
    }}
    schema = schemas.crd_to_json_schema(crd)
    import jsonschema

    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid({"port": 1}) and v.is_valid({"port": "http"}) and v.is_valid({"maybe": None})
    assert v.is_valid({"free": {"a": "x", "anything": 1}})
    assert not v.is_valid({"other": 1})
