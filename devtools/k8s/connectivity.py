"""Who dials whom, read from the rendered manifests, and whether the NetworkPolicies let it through.

A hand-kept list of flows went stale once (the gateway's moderation health check was never
allowed out, so every Chat was refused on a cluster that enforces policies). Here the flows come
from what the containers are configured to dial:

- every variable named like an address (`*_ADDR`, `*_ADDRESS`, `*_URL`, `*_BOOTSTRAP_SERVERS`,
  `*_ENDPOINT`) and every value shaped like one (`host:port`, `scheme://[user[:password]@]host[:port]`);
  database URLs count too (`DATABASE_URL=postgresql+psycopg://user@postgres:5432/db`: the host and
  port, or the scheme's default port; `sqlite:///file` names no peer);
- `KAFKA_BOOTSTRAP_SERVERS` counts only in containers with a Kafka user (`KAFKA_SASL_USERNAME`):
  `colloquy-common` hands it to every process, but the only listener requires SCRAM
  (`test_connectivity` checks that), so a container without a user never connects.

Each address resolves to the pods behind it: a Service in the render (its selector, the port's
targetPort), or Strimzi's `<cluster>-kafka-bootstrap` (the broker pods, the listener port, and the
ingress policy Strimzi writes from the listener's `networkPolicyPeers`). `allowed()` evaluates
NetworkPolicy semantics for one flow in one namespace, for egress at the source and ingress at
the target. sync.py generates the `dials-*`/`dialed-*` policies from `dials()`; the tests check
every flow with `allowed()` over the whole render.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit

from devtools.k8s import manifests
from devtools.k8s.manifests import Obj, PodTemplate

ADDRESS_VAR = re.compile(r"_(ADDR|ADDRESS|URL|BOOTSTRAP_SERVERS|ENDPOINT)$")
ADDRESS_VALUE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://(?:[^/@\s]+@)?)?[A-Za-z0-9.$()_-]+:\d{1,5}(?:/.*)?$")
# Values an address variable may hold that name no peer: unset, or Ray's "the cluster on this node".
LOCAL_VALUES = {"", "auto"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
KAFKA_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
KAFKA_USER = "KAFKA_SASL_USERNAME"
POD_IP = "<pod-ip>"  # stands in for fieldRef status.podIP: the pod itself
# Ports of URLs that name none, by scheme; SQLAlchemy's `dialect+driver` counts as its dialect.
DEFAULT_SCHEME_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432}
# URL schemes that name a local file, not a peer (SQLAlchemy's embedded SQLite).
LOCAL_SCHEMES = {"sqlite"}
# Namespaces outside the render whose Services a container may dial: their pods are not in the
# render, so those flows are hand-written in k8s/base/network/policies.yaml (`rlhf-to-prometheus`).
OTHER_NAMESPACES = {"monitoring"}


@dataclasses.dataclass(frozen=True)
class Dial:
    """One address one container is configured to connect to."""

    source: PodTemplate
    container: str
    var: str
    value: str
    host: str
    port: int

    def where(self) -> str:
        return f"{self.source.owner}/{self.container} {self.var}={self.value}"


@dataclasses.dataclass(frozen=True)
class Target:
    """The pods behind an address: their labels and the port they listen on."""

    what: str  # e.g. "Service/moderation"
    pod_labels: tuple[tuple[tuple[str, str], ...], ...]  # one label set per pod template
    port: int
    port_name: str | None
    selector: dict[str, Any]  # a podSelector that picks exactly these pods (for generated policies)

    def labels(self) -> list[dict[str, str]]:
        return [dict(items) for items in self.pod_labels]


def _expand(env: dict[str, manifests.EnvValue]) -> dict[str, str]:
    """Literal values with $(VAR) expanded; the pod IP as POD_IP, other references dropped."""
    raw: dict[str, str] = {}
    for name, v in env.items():
        if v.value is not None:
            raw[name] = v.value
        elif v.field_ref == "status.podIP":
            raw[name] = POD_IP
    return manifests.expand_vars(raw)


def _split(value: str) -> list[tuple[str, int]]:
    """host:port pairs of an address setting (a comma-separated list for Kafka, a URL, host:port)."""
    out = []
    for item in (part.strip() for part in value.split(",")):
        if "://" in item:
            url = urlsplit(item)
            scheme = url.scheme.split("+", 1)[0]
            if scheme in LOCAL_SCHEMES:
                continue
            port = url.port or DEFAULT_SCHEME_PORTS.get(scheme)
            if not url.hostname or port is None:
                raise ValueError(f"no host or port in {item!r}")
            out.append((url.hostname, port))
        else:
            host, sep, port_text = item.rpartition(":")
            if not sep or not host or not port_text.isdigit():
                raise ValueError(f"{item!r} is not host:port")
            out.append((host, int(port_text)))
    return out


class UnresolvedError(AssertionError):
    """An address setting the checks cannot follow: fix the value or teach connectivity.py."""


def dials(objects: list[Obj]) -> list[Dial]:
    """Every (container, address) in the render, the container's own pod left out."""
    configmaps = manifests.by_kind(objects, "ConfigMap")
    out: list[Dial] = []
    bad: list[str] = []
    for pt in manifests.all_pod_templates(objects):
        for c in pt.containers() + pt.init_containers():
            env = manifests.effective_env(c, configmaps)
            values = _expand(env)
            for var, value in sorted(values.items()):
                if not (ADDRESS_VAR.search(var) or ADDRESS_VALUE.match(value)):
                    continue
                if var == KAFKA_BOOTSTRAP and KAFKA_USER not in env:
                    continue  # module docstring: no Kafka user, no connection
                if value in LOCAL_VALUES:
                    continue
                try:
                    pairs = _split(value)
                except ValueError as exc:
                    bad.append(f"{pt.owner}/{c['name']} {var}={value!r}: {exc}")
                    continue
                for host, port in pairs:
                    if host == POD_IP or host in LOOPBACK:
                        continue  # the pod itself: no policy applies
                    if _other_namespace(host):
                        continue  # not in the render: a hand-written policy (OTHER_NAMESPACES)
                    out.append(Dial(pt, c["name"], var, value, host, port))
    if bad:
        raise UnresolvedError("address settings that are not addresses:\n" + "\n".join(bad))
    return out


def _other_namespace(host: str) -> bool:
    """Whether `host` is a Service DNS name in one of OTHER_NAMESPACES (`name.ns.svc[.cluster.local]`)."""
    parts = host.split(".")
    return len(parts) >= 3 and parts[1] in OTHER_NAMESPACES and parts[2] == "svc"


def _service_name(host: str) -> str | None:
    """The Service a cluster DNS name in the namespace points at, or None for other names."""
    suffixes = ("", f".{manifests.NAMESPACE}", f".{manifests.NAMESPACE}.svc",
                f".{manifests.NAMESPACE}.svc.cluster.local")
    for suffix in sorted(suffixes, key=len, reverse=True):
        if suffix and host.endswith(suffix):
            name = host[: -len(suffix)]
            return name if "." not in name else None
    return host if "." not in host else None


def _frozen(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _container_port(pts: list[PodTemplate], port: int | str) -> tuple[int, str | None]:
    """A Service targetPort (number or name) as (number, name) on the pods it selects."""
    found = {(p["containerPort"], p.get("name")) for pt in pts for c in pt.containers()
             for p in c.get("ports", []) if port in (p["containerPort"], p.get("name"))}
    if isinstance(port, int) and not found:
        return port, None
    if len(found) != 1:
        raise UnresolvedError(f"targetPort {port!r} is {sorted(found) or 'on no container'}")
    return next(iter(found))


def broker_labels(objects: list[Obj], cluster: str) -> list[dict[str, str]]:
    """Labels Strimzi gives the broker pods of `cluster` (one set per broker KafkaNodePool)."""
    out = []
    for pool in manifests.by_kind(objects, "KafkaNodePool").values():
        if pool["metadata"].get("labels", {}).get("strimzi.io/cluster") != cluster:
            continue
        if "broker" not in pool["spec"].get("roles", []):
            continue
        labels = {"strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka",
                  "strimzi.io/name": f"{cluster}-kafka", "strimzi.io/pool-name": pool["metadata"]["name"],
                  "strimzi.io/broker-role": "true"}
        labels.update(pool["spec"].get("template", {}).get("pod", {}).get("metadata", {}).get("labels", {}))
        out.append(labels)
    return out


def strimzi_policies(objects: list[Obj]) -> list[Obj]:
    """The ingress NetworkPolicy Strimzi writes per Kafka cluster: each listener's port from its
    networkPolicyPeers (from anywhere when a listener names none)."""
    out = []
    for kafka in manifests.by_kind(objects, "Kafka").values():
        name = kafka["metadata"]["name"]
        rules = []
        for listener in kafka["spec"]["kafka"].get("listeners", []):
            rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": listener["port"]}]}
            if listener.get("networkPolicyPeers"):
                rule["from"] = listener["networkPolicyPeers"]
            rules.append(rule)
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": f"{name}-network-policy-kafka", "namespace": manifests.NAMESPACE},
                    "spec": {"podSelector": {"matchLabels": {"strimzi.io/name": f"{name}-kafka"}},
                             "policyTypes": ["Ingress"], "ingress": rules}})
    return out


def resolve(objects: list[Obj], dial: Dial) -> Target:
    """The pods and port `dial` reaches; UnresolvedError when the render has nothing there."""
    name = _service_name(dial.host)
    if name is None:
        raise UnresolvedError(f"{dial.where()}: {dial.host!r} is not a name in namespace {manifests.NAMESPACE}")
    pts = manifests.all_pod_templates(objects)
    service = manifests.by_kind(objects, "Service").get(name)
    if service is not None:
        ports = [p for p in service["spec"]["ports"] if p["port"] == dial.port]
        if not ports:
            raise UnresolvedError(f"{dial.where()}: Service/{name} has no port {dial.port}")
        selector = {"matchLabels": dict(service["spec"].get("selector") or {})}
        behind = [pt for pt in pts if selector["matchLabels"] and manifests.selects(selector, pt.labels)]
        if not behind:
            raise UnresolvedError(f"{dial.where()}: Service/{name} selects no pod template")
        try:
            number, port_name = _container_port(behind, ports[0].get("targetPort", dial.port))
        except UnresolvedError as exc:
            raise UnresolvedError(f"{dial.where()}: Service/{name} {exc}") from None
        return Target(f"Service/{name}", tuple(_frozen(pt.labels) for pt in behind), number, port_name, selector)
    for kafka in manifests.by_kind(objects, "Kafka").values():
        cluster = kafka["metadata"]["name"]
        if name == f"{cluster}-kafka-bootstrap":
            listeners = [li for li in kafka["spec"]["kafka"].get("listeners", []) if li["port"] == dial.port]
            if not listeners:
                raise UnresolvedError(f"{dial.where()}: Kafka/{cluster} has no listener on {dial.port}")
            brokers = broker_labels(objects, cluster)
            if not brokers:
                raise UnresolvedError(f"{dial.where()}: Kafka/{cluster} has no broker node pool")
            return Target(f"Kafka/{cluster} listener {listeners[0]['name']}",
                          tuple(_frozen(b) for b in brokers), dial.port, None,
                          {"matchLabels": {"strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka"}})
    raise UnresolvedError(f"{dial.where()}: no Service {name!r} in the render (nor a Strimzi bootstrap)")


# -- NetworkPolicy semantics (one namespace) -------------------------------------------------------

NAMESPACE_LABELS = {"kubernetes.io/metadata.name": manifests.NAMESPACE}


def _peer_matches(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a peer selects a pod of this namespace with `labels`. ipBlock never does here:
    whether a CIDR rule covers pod IPs differs between CNIs, so no flow may rely on it."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and not manifests.selects(peer["namespaceSelector"], NAMESPACE_LABELS):
        return False
    if "podSelector" in peer:
        return manifests.selects(peer["podSelector"], labels)
    return "namespaceSelector" in peer  # a namespace peer alone: every pod of those namespaces


def _port_matches(rule_port: dict[str, Any], number: int, name: str | None) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    port = rule_port.get("port")
    if port is None:
        return True
    if isinstance(port, str):
        return port == name
    return port == number or (rule_port.get("endPort") is not None and port <= number <= rule_port["endPort"])


def admits(policies: list[Obj], pod: dict[str, str], direction: str, peer: dict[str, str],
           number: int, name: str | None) -> bool:
    """Whether `pod`'s policies for `direction` ("Ingress"/"Egress") admit traffic with `peer`
    on the target port: not isolated for that direction, or some rule matching both."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applying = [p for p in policies if direction in p["spec"].get("policyTypes", ["Ingress"])
                and manifests.selects(p["spec"]["podSelector"], pod)]
    if not applying:
        return True
    for pol in applying:
        for rule in pol["spec"].get(key) or []:
            peers_ok = not rule.get(peers_key) or any(_peer_matches(p, peer) for p in rule[peers_key])
            ports_ok = not rule.get("ports") or any(_port_matches(p, number, name) for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def policies(objects: list[Obj]) -> list[Obj]:
    """The render's NetworkPolicies plus the ones Strimzi writes for it."""
    return list(manifests.by_kind(objects, "NetworkPolicy").values()) + strimzi_policies(objects)


def blocked(objects: list[Obj]) -> list[str]:
    """Every configured flow a policy would drop, each with the side that drops it."""
    pols = policies(objects)
    out = []
    for dial in dials(objects):
        target = resolve(objects, dial)
        for dst in target.labels():
            missing = [side for side, ok in (
                ("egress at the source", admits(pols, dial.source.labels, "Egress", dst, target.port,
                                                target.port_name)),
                ("ingress at the target", admits(pols, dst, "Ingress", dial.source.labels, target.port,
                                                 target.port_name))) if not ok]
            if missing:
                out.append(f"{dial.where()} -> {target.what} port {target.port}: no "
                           + " and no ".join(missing))
    return out
