"""Offline schema validation: Kubernetes kinds and the CRDs in ../shared/k8s-crds.

- Built-in kinds: the JSON schemas shipped inside the `kubernetes-validate` wheel, `-strict`
  variant (unknown fields are errors), as `kubectl apply --validate=strict` would judge them.
- Custom resources: each CRD's `openAPIV3Schema` for the served version, turned into a JSON
  schema with `crd_to_json_schema` (structural-schema rules: unknown fields are errors unless
  `x-kubernetes-preserve-unknown-fields`, int-or-string, nullable) and checked with `jsonschema`;
  `metadata` is checked against Kubernetes' ObjectMeta. CEL rules (`x-kubernetes-validations`,
  14 in these CRDs) are not evaluated offline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from devtools.k8s.manifests import ROOT, Obj

CRD_DIR = Path(os.environ.get("COLLOQUY_K8S_CRDS", str(ROOT.parent / "shared" / "k8s-crds")))
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = {"$ref": f"{DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
# The Kubernetes versions the manifests must be valid for: the oldest we support and the newest
# the wheel knows (native gRPC probes and CronJob timeZone are GA since 1.27).
K8S_VERSIONS = ("1.30.0", "1.37.0")
# libyaml's loader: the CRDs are 3.5 MB of YAML, ten times faster to parse than in pure Python.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DROP = {"description", "example", "externalDocs", "default", "format", "nullable"}


def crd_to_json_schema(node: Any, *, strict: bool = True, in_combinator: bool = False) -> Any:
    """A CRD structural schema node as a JSON schema (draft 2020-12)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: crd_to_json_schema(sub, strict=strict) for name, sub in value.items()}
        elif key in {"items", "not"}:
            out[key] = crd_to_json_schema(value, strict=strict)
        elif key == "additionalProperties":
            out[key] = crd_to_json_schema(value, strict=strict) if isinstance(value, dict) else value
        elif key in {"anyOf", "oneOf", "allOf"}:
            # Branches only add value checks to the node's own properties (structural schemas).
            out[key] = [crd_to_json_schema(sub, strict=strict, in_combinator=True) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (strict and not in_combinator and out.get("type") == "object" and "properties" in out
            and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@dataclasses.dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    served: tuple[str, ...]
    schemas: dict[str, Any]  # version -> JSON schema
    source: Path


@functools.cache
def crds() -> dict[tuple[str, str], Crd]:
    """(group, kind) -> CRD, from every YAML file under CRD_DIR."""
    found: dict[tuple[str, str], Crd] = {}
    for path in sorted(CRD_DIR.rglob("*.yaml")):
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_LOADER):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            versions = [v for v in spec["versions"] if v.get("served")]
            schemas = {}
            for v in versions:
                schema = crd_to_json_schema(v["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})["metadata"] = OBJECT_META
                schemas[v["name"]] = schema
            found[(spec["group"], spec["names"]["kind"])] = Crd(
                spec["group"], spec["names"]["kind"], tuple(v["name"] for v in versions), schemas, path)
    return found


@functools.cache
def _definitions(version: str) -> Any:
    from kubernetes_validate import utils

    return utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)


@functools.cache
def _registry(version: str) -> Registry:
    return Resource.from_contents(_definitions(version)) @ Registry()


class NoSchema(LookupError):
    """Neither Kubernetes nor the shared CRDs define this apiVersion/kind."""


@functools.cache
def _k8s_validator(version: str, api_version: str, kind: str) -> jsonschema.Validator | None:
    import re

    from kubernetes_validate import utils

    # kubernetes-validate's file naming: rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    name = f"kubernetes-json-schema/v{version}-local-strict/{kind.lower()}-{group_version}.json"
    try:
        schema = utils.schema_contents(name, version)
    except FileNotFoundError:
        return None
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


@functools.cache
def _crd_validator(api_version: str, kind: str, version: str) -> jsonschema.Validator | None:
    group, _, crd_version = api_version.rpartition("/")
    crd = crds().get((group, kind))
    if crd is None:
        return None
    if crd_version not in crd.schemas:
        raise NoSchema(f"{kind}: {api_version} is not served by {crd.source.name} "
                       f"(served: {', '.join(crd.served)})")
    return jsonschema.Draft202012Validator(crd.schemas[crd_version], registry=_registry(version))


def validate(obj: Obj, version: str = K8S_VERSIONS[-1]) -> list[str]:
    """Every schema error of `obj` (empty: valid). Raises NoSchema for an unknown kind."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    validator = _crd_validator(api_version, kind, version) if "." in api_version.split("/")[0] else None
    if validator is None:
        validator = _k8s_validator(version, api_version, kind)
    if validator is None:
        raise NoSchema(f"no schema for {api_version} {kind} (Kubernetes {version} or {CRD_DIR})")
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}" for e in errors]
