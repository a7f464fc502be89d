"""Every address a container is configured to dial is allowed by the NetworkPolicies at both ends.

The flows are derived from the rendered manifests (devtools/k8s/connectivity.py), never listed by
hand: a new `*_ADDR` in a ConfigMap is checked the moment it is added. The generated `dials-*`
and `dialed-*` policies (k8s/base/network/dials.yaml, `make k8s-sync`) are how the manifests
satisfy it; `internal-grpc-ingress` and the rest of policies.yaml stay hand-written.
"""

from __future__ import annotations

import copy

import pytest

from devtools.k8s import connectivity, manifests, sync
from devtools.k8s.manifests import Obj


def test_every_dialed_address_is_allowed_by_egress_and_ingress(objects: list[Obj]) -> None:
    """The issue-16 bug: the gateway's MODERATION_ADDR had ingress at moderation but no egress."""
    blocked = connectivity.blocked(objects)
    assert not blocked, "flows the NetworkPolicies drop:\n" + "\n".join(blocked)


def test_every_address_setting_resolves_to_pods_in_the_render(objects: list[Obj]) -> None:
    """An address that names no Service (a typo, a renamed Service) fails here, not in production."""
    dials = connectivity.dials(objects)
    targets = {connectivity.resolve(objects, d).what for d in dials}
    # The flows the services cannot work without are among those derived.
    assert {"Service/moderation", "Service/pushgateway"} <= targets, targets
    assert any(t.startswith(f"Kafka/{manifests.KAFKA_CLUSTER} ") for t in targets), targets
    gateway = {(d.var, d.host, d.port) for d in dials if d.source.owner == "StatefulSet/gateway"}
    assert ("MODERATION_ADDR", "moderation", 50053) in gateway, gateway


def test_kafka_listeners_all_require_a_user(objects: list[Obj]) -> None:
    """Why KAFKA_BOOTSTRAP_SERVERS counts only where a Kafka user is set: no listener takes
    anonymous clients, so a container without KAFKA_SASL_USERNAME never connects."""
    for kafka in manifests.by_kind(objects, "Kafka").values():
        for listener in kafka["spec"]["kafka"]["listeners"]:
            assert listener.get("authentication", {}).get("type") == "scram-sha-512", listener["name"]


def test_dial_policies_are_generated_from_the_current_render(render) -> None:  # type: ignore[no-untyped-def]
    """k8s/base/network/dials.yaml is what `make k8s-sync` derives from today's manifests."""
    assert sync.DIALS_FILE.read_text(encoding="utf-8") == sync.dial_policies_text(render), \
        "stale k8s/base/network/dials.yaml: run scripts/k8s-sync.sh"


def test_generated_egress_grants_only_dialed_flows(objects: list[Obj]) -> None:
    """Least privilege: each generated egress rule is one some selected pod is configured to use."""
    used = {(d.source.owner, connectivity.resolve(objects, d).port) for d in connectivity.dials(objects)}
    pts = manifests.all_pod_templates(objects)
    for pol in manifests.by_kind(objects, "NetworkPolicy").values():
        if not pol["metadata"]["name"].startswith(sync.DIALS_PREFIX):
            continue
        selected = [pt.owner for pt in pts if manifests.selects(pol["spec"]["podSelector"], pt.labels)]
        assert selected, f"{pol['metadata']['name']} selects no pod"
        for rule in pol["spec"]["egress"]:
            for port in rule["ports"]:
                assert any((owner, port["port"]) in used for owner in selected), \
                    f"{pol['metadata']['name']}: port {port['port']} is dialed by none of {selected}"


# -- The checker itself, on small hand-made renders ----------------------------------------------


def _pod(name: str, env: dict[str, str], labels: dict[str, str] | None = None,
         ports: dict[str, int] | None = None) -> Obj:
    return {"kind": "Deployment", "metadata": {"name": name}, "spec": {"template": {
        "metadata": {"labels": {"app.kubernetes.io/name": name, **(labels or {})}},
        "spec": {"containers": [{"name": name, "env": [{"name": k, "value": v} for k, v in env.items()],
                                 "ports": [{"name": n, "containerPort": p} for n, p in (ports or {}).items()]}]}}}}


def _service(name: str, port: int) -> Obj:
    return {"kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app.kubernetes.io/name": name},
                     "ports": [{"name": "grpc", "port": port, "targetPort": "grpc"}]}}


def _policy(name: str, selector: dict[str, str], types: list[str], **rules: object) -> Obj:
    return {"kind": "NetworkPolicy", "metadata": {"name": name},
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": types, **rules}}


DENY = _policy("default-deny", {}, ["Ingress", "Egress"])
INGRESS = _policy("internal", {"app.kubernetes.io/name": "moderation"}, ["Ingress"],
                  ingress=[{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": "grpc"}]}])


def _render(*policies: Obj) -> list[Obj]:
    return [_pod("gateway", {"MODERATION_ADDR": "moderation.colloquy.svc:50053", "GRPC_HOST": "0.0.0.0"}),
            _pod("moderation", {}, ports={"grpc": 50053}), _service("moderation", 50053), *policies]


def test_checker_reports_the_old_gateway_bug_missing_egress() -> None:
    (line,) = connectivity.blocked(_render(DENY, INGRESS))
    assert "MODERATION_ADDR" in line and "no egress at the source" in line and "ingress" not in line.split(":")[-1]


def test_checker_accepts_egress_by_number_and_ingress_by_port_name() -> None:
    egress = _policy("out", {"app.kubernetes.io/name": "gateway"}, ["Egress"], egress=[{
        "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "moderation"}}}],
        "ports": [{"protocol": "TCP", "port": 50053}]}])
    assert connectivity.blocked(_render(DENY, INGRESS, egress)) == []
    wrong_port = copy.deepcopy(egress)
    wrong_port["spec"]["egress"][0]["ports"] = [{"protocol": "UDP", "port": 50053}]
    assert connectivity.blocked(_render(DENY, INGRESS, wrong_port))


def test_checker_does_not_count_ip_blocks_or_other_namespaces() -> None:
    """0.0.0.0/0 egress (the apiserver rule) and a peer in another namespace open no pod flow."""
    ip = _policy("ip", {}, ["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}])
    other_ns = _policy("ns", {}, ["Egress"], egress=[{"to": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}])
    assert connectivity.blocked(_render(DENY, INGRESS, ip, other_ns))


@pytest.mark.parametrize("value", ["moderation:99", "nowhere:50053", "moderation.other-ns:50053", "moderation"])
def test_checker_rejects_addresses_it_cannot_resolve(value: str) -> None:
    docs = _render(DENY, INGRESS)
    docs[0]["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "MODERATION_ADDR", "value": value}]
    with pytest.raises(connectivity.UnresolvedError):
        connectivity.blocked(docs)


def test_kafka_bootstrap_counts_only_with_a_kafka_user() -> None:
    docs = [_pod("job", {"KAFKA_BOOTSTRAP_SERVERS": "colloquy-kafka-bootstrap:9093"})]
    assert connectivity.dials(docs) == []
    docs[0]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "KAFKA_SASL_USERNAME", "value": "colloquy-job"})
    (dial,) = connectivity.dials(docs)
    assert (dial.host, dial.port) == ("colloquy-kafka-bootstrap", 9093)


@pytest.mark.parametrize(("value", "expected"), [
    ("postgresql+psycopg://colloquy@postgres:5432/colloquy", ("postgres", 5432)),
    ("postgresql+psycopg://colloquy:$(POSTGRES_PASSWORD)@postgres.colloquy.svc:5432/colloquy",
     ("postgres.colloquy.svc", 5432)),
    ("postgresql://colloquy@postgres/colloquy", ("postgres", 5432)),  # libpq's default port
])
def test_database_urls_resolve_to_their_host_and_port(value: str, expected: tuple[str, int]) -> None:
    """DATABASE_URL forms (SQLAlchemy's dialect+driver, user[:password]@, no port) are addresses."""
    (dial,) = connectivity.dials([_pod("conversation", {"DATABASE_URL": value})])
    assert (dial.host, dial.port) == expected


def test_a_database_url_under_any_name_is_an_address() -> None:
    """Found by its shape too, credentials and all, like host:port values are."""
    (dial,) = connectivity.dials([_pod("reader", {"STORE_DSN": "postgresql://colloquy:pw@postgres:5432/db"})])
    assert (dial.var, dial.host, dial.port) == ("STORE_DSN", "postgres", 5432)


def test_an_sqlite_url_names_no_peer() -> None:
    assert connectivity.dials([_pod("conversation", {"DATABASE_URL": "sqlite:///var/conversations.db"})]) == []


def test_checker_reports_a_database_dial_without_policies_and_resolves_it_to_the_service() -> None:
    docs = [_pod("conversation", {"DATABASE_URL": "postgresql+psycopg://colloquy@postgres:5432/colloquy"}),
            _pod("postgres", {}, ports={"postgres": 5432}),
            {"kind": "Service", "metadata": {"name": "postgres"},
             "spec": {"selector": {"app.kubernetes.io/name": "postgres"},
                      "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres"}]}}, DENY]
    (dial,) = connectivity.dials(docs)
    target = connectivity.resolve(docs, dial)
    assert (target.what, target.port, target.port_name) == ("Service/postgres", 5432, "postgres")
    (line,) = connectivity.blocked(docs)
    assert "DATABASE_URL" in line and "no egress at the source and no ingress at the target" in line
