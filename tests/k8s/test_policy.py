"""Policies a cluster operator would enforce on the rendered manifests.

Rules, for every container of every pod template (Deployments, StatefulSets, Jobs, CronJobs,
the Ray head and worker groups of the RayService and of the RLHF RayJob template):
- requests and limits for cpu and memory (GPU requests equal GPU limits);
- readiness and liveness probes, except in pods that run to completion (Job, CronJob) and in init
  containers, where a probe has nothing to report; gRPC services probe natively (`grpc.port`),
  except with TLS (prod), where an exec probe speaks it (tests/k8s/test_tls.py);
- non-root (runAsNonRoot and a non-zero runAsUser), no privilege escalation, read-only root
  filesystem with an emptyDir at /tmp, all capabilities dropped, seccomp RuntimeDefault;
- a pinned image: registry/name:tag with a version tag (never `latest`) or a digest.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from devtools.k8s import connectivity, manifests, sync
from devtools.k8s.manifests import Obj, PodTemplate

IMAGE = re.compile(r"^(?P<repo>[a-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)+)"
                   r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@sha256:[0-9a-f]{64})?$")
# Secrets the render references but does not contain, by who makes them.
STRIMZI_SECRETS = {f"{manifests.KAFKA_CLUSTER}-cluster-ca-cert"}  # + one per KafkaUser (added below)
# Created by whoever deploys (README): prod's API keys and each gRPC service's TLS Secret (and
# web's, a gRPC client of the gateway and moderation).
# prod: also PostgreSQL's passwords (Secret `postgres`; dev generates it).
OPERATOR_SECRETS = {"prod": {"gateway-api-keys", "postgres"} | {
                        f"{s}-tls" for s in ("gateway", "tokenizer", "moderation", "prompt", "feedback",
                                             "conversation", "web", "rlhf")},
                    "dev": set()}
# The public fronts: the only pods open beyond the namespace, each on one port, by one policy.
PUBLIC_INGRESS = {"gateway-ingress": ("gateway", "grpc"), "web-ingress": ("web", "http")}
OPERATOR_NAMESPACES = {"kuberay-system", "monitoring"}


def _containers(objects: list[Obj]) -> list[tuple[PodTemplate, dict[str, Any], bool]]:
    out = []
    for pt in manifests.all_pod_templates(objects):
        out.extend((pt, c, False) for c in pt.containers())
        out.extend((pt, c, True) for c in pt.init_containers())
    return out


def test_every_container_has_requests_and_limits(objects: list[Obj]) -> None:
    bad = []
    for pt, c, _ in _containers(objects):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part, {}))
            if missing:
                bad.append(f"{pt.owner}/{c['name']}: {part} lacks {sorted(missing)}")
        gpu = "nvidia.com/gpu"
        if res.get("limits", {}).get(gpu) != res.get("requests", {}).get(gpu):
            bad.append(f"{pt.owner}/{c['name']}: GPU requests must equal limits")
    assert not bad, "\n".join(bad)


def test_server_containers_have_probes(objects: list[Obj]) -> None:
    bad = []
    for pt, c, init in _containers(objects):
        if init or not pt.long_running:
            continue  # the module docstring's rule: run-to-completion and init containers are exempt
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in c:
                bad.append(f"{pt.owner}/{c['name']}: no {probe}")
    assert not bad, "\n".join(bad)


def test_grpc_services_probe_grpc_health(docs: list[Obj]) -> None:
    """grpc.health.v1.Health on the service's own port: natively in plaintext, through
    services.common.health_probe (which follows TLS_DIR) where TLS is on."""
    checked = 0
    for sts in manifests.by_kind(docs, "StatefulSet").values():
        if sts["metadata"]["name"] == "postgres":
            continue  # not a gRPC service: pg_isready (test_postgres.py)
        for c in sts["spec"]["template"]["spec"]["containers"]:
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                native = c[probe].get("grpc", {}).get("port") == port
                execd = c[probe].get("exec", {}).get("command") == [
                    "python", "-m", "services.common.health_probe", f"127.0.0.1:{port}"]
                assert native != execd, f"{sts['metadata']['name']} {probe}"
            checked += 1
    assert checked == 6  # gateway, tokenizer, moderation, prompt, feedback, conversation


def _pod_sc(pt: PodTemplate) -> dict[str, Any]:
    return pt.spec.get("securityContext", {})


def test_every_container_runs_locked_down(objects: list[Obj]) -> None:
    bad = []
    for pt, c, _ in _containers(objects):
        sc, pod = c.get("securityContext", {}), _pod_sc(pt)
        where = f"{pt.owner}/{c['name']}"

        def eff(key: str, sc: dict[str, Any] = sc, pod: dict[str, Any] = pod) -> Any:
            return sc.get(key, pod.get(key))

        if eff("runAsNonRoot") is not True:
            bad.append(f"{where}: runAsNonRoot is not true")
        if not isinstance(eff("runAsUser"), int) or eff("runAsUser") == 0:
            bad.append(f"{where}: runAsUser must be a non-zero UID")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: readOnlyRootFilesystem is not true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            bad.append(f"{where}: capabilities must drop ALL and add none")
        if (eff("seccompProfile") or {}).get("type") not in {"RuntimeDefault", "Localhost"}:
            bad.append(f"{where}: seccompProfile is not RuntimeDefault")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        vols = {v["name"]: v for v in pt.spec.get("volumes", [])}
        if not tmp or "emptyDir" not in vols.get(tmp[0]["name"], {}):
            bad.append(f"{where}: no emptyDir at /tmp (the root filesystem is read-only)")
    assert not bad, "\n".join(bad)


def test_every_image_is_pinned(objects: list[Obj]) -> None:
    bad = []
    for pt, c, _ in _containers(objects):
        m = IMAGE.match(c.get("image", ""))
        tag = m and m.group("tag")
        digest = m and "@sha256:" in c["image"]
        if not m or not (digest or (tag and tag != "latest" and re.search(r"\d", tag))):
            bad.append(f"{pt.owner}/{c['name']}: image {c.get('image')!r} is not pinned to a version or digest")
    assert not bad, "\n".join(bad)


def test_in_tree_autoscaler_is_locked_down_too(objects: list[Obj]) -> None:
    # KubeRay injects the autoscaler container; autoscalerOptions is where we constrain it.
    for rs in (o for o in objects if o["kind"] == "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        if cluster.get("enableInTreeAutoscaling"):
            opts = cluster.get("autoscalerOptions", {})
            assert {"cpu", "memory"} <= set(opts.get("resources", {}).get("limits", {}))
            sc = opts.get("securityContext", {})
            assert sc.get("runAsNonRoot") and sc.get("allowPrivilegeEscalation") is False
            assert "ALL" in sc.get("capabilities", {}).get("drop", [])


def test_every_metrics_service_has_a_service_monitor(docs: list[Obj]) -> None:
    monitors = list(manifests.by_kind(docs, "ServiceMonitor").values())
    missing = []
    for svc in manifests.by_kind(docs, "Service").values():
        labels = svc["metadata"].get("labels", {})
        for port in svc["spec"]["ports"]:
            if not port["name"].endswith("metrics"):
                continue
            if not any(manifests.selects(sm["spec"]["selector"], labels)
                       and port["name"] in {e.get("port") for e in sm["spec"]["endpoints"]} for sm in monitors):
                missing.append(f"Service/{svc['metadata']['name']} port {port['name']}")
    assert not missing, "no ServiceMonitor scrapes: " + ", ".join(missing)


def test_every_metrics_port_is_behind_a_service(docs: list[Obj]) -> None:
    services = list(manifests.by_kind(docs, "Service").values())
    missing = []
    for pt in manifests.all_pod_templates(docs):
        for c in pt.containers():
            for port in c.get("ports", []):
                if port.get("name", "").endswith("metrics") and not any(
                        manifests.selects({"matchLabels": s["spec"].get("selector", {})}, pt.labels)
                        and port["name"] in {p.get("targetPort") for p in s["spec"]["ports"]} for s in services):
                    missing.append(f"{pt.owner}/{c['name']}:{port['name']}")
    assert not missing, "metrics ports no Service exposes: " + ", ".join(missing)


def test_service_monitors_and_services_select_something(docs: list[Obj]) -> None:
    services = manifests.by_kind(docs, "Service")
    pods = manifests.all_pod_templates(docs)
    for sm in manifests.by_kind(docs, "ServiceMonitor").values():
        matched = [s for s in services.values()
                   if manifests.selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert matched, f"ServiceMonitor/{sm['metadata']['name']} selects no Service"
        ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    for svc in services.values():
        selector = {"matchLabels": svc["spec"]["selector"]}
        assert any(manifests.selects(selector, pt.labels) for pt in pods), f"Service/{svc['metadata']['name']}"


def test_references_resolve(docs: list[Obj], objects: list[Obj], overlay: str) -> None:
    """Every ConfigMap, Secret, PVC and ServiceAccount a pod names exists (or is made by someone named)."""
    have = {kind: set(manifests.by_kind(docs, kind)) for kind in
            ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount")}
    have["Secret"] |= STRIMZI_SECRETS | set(manifests.by_kind(docs, "KafkaUser")) | OPERATOR_SECRETS[overlay]
    have["ServiceAccount"].add("default")
    # A StatefulSet's volumeClaimTemplates are volumes of its pods too (postgres' data).
    claims = {manifests.ident(o): {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])}
              for o in objects if o["kind"] == "StatefulSet"}
    missing = []
    for pt in manifests.all_pod_templates(objects):
        refs: list[tuple[str, str]] = [("ServiceAccount", pt.spec.get("serviceAccountName", "default"))]
        for v in pt.spec.get("volumes", []):
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"]))
            if "persistentVolumeClaim" in v:
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
        for c in pt.containers() + pt.init_containers():
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    refs.append(("ConfigMap", src["configMapRef"]["name"]))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    refs.append(("Secret", ref["secretKeyRef"]["name"]))
                if "configMapKeyRef" in ref:
                    refs.append(("ConfigMap", ref["configMapKeyRef"]["name"]))
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            unknown = mounts - {v["name"] for v in pt.spec.get("volumes", [])} - claims.get(pt.owner, set())
            assert not unknown, f"{pt.owner}/{c['name']} mounts undefined volumes {unknown}"
        missing.extend(f"{pt.owner}: {kind}/{name}" for kind, name in refs if name not in have[kind])
    assert not missing, "\n".join(missing)


def test_everything_is_in_the_namespace_and_labelled(docs: list[Obj]) -> None:
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == manifests.NAMESPACE
            continue
        assert d["metadata"].get("namespace") == manifests.NAMESPACE, manifests.ident(d)
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "colloquy", manifests.ident(d)
    idents = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(idents) == len(set(idents))


# -- Network policies ---------------------------------------------------------------------------


def _policies(docs: list[Obj]) -> dict[str, Obj]:
    return manifests.by_kind(docs, "NetworkPolicy")


def _applying(docs: list[Obj], labels: dict[str, str], direction: str) -> list[Obj]:
    return [p for p in _policies(docs).values()
            if direction in p["spec"]["policyTypes"] and manifests.selects(p["spec"]["podSelector"], labels)]


def test_default_deny(docs: list[Obj]) -> None:
    deny = _policies(docs)["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny


def test_only_the_public_fronts_are_open_beyond_the_namespace(docs: list[Obj]) -> None:
    """The gateway's gRPC port and web's HTTP port, nothing else (and both are there)."""
    policies = _policies(docs)
    assert set(PUBLIC_INGRESS) <= set(policies)
    for name, pol in policies.items():
        for rule in pol["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:  # open to every source
                assert name in PUBLIC_INGRESS, f"{name} admits traffic from anywhere"
                app, port = PUBLIC_INGRESS[name]
                assert pol["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": app}}
                assert [p["port"] for p in rule["ports"]] == [port]
                continue
            for peer in peers:
                assert "ipBlock" not in peer, f"{name}: ipBlock ingress"
                ns = peer.get("namespaceSelector")
                if ns is not None:
                    assert ns.get("matchLabels", {}).get("kubernetes.io/metadata.name") in OPERATOR_NAMESPACES, name


def test_services_reach_dns_kafka_and_only_the_addresses_they_dial(docs: list[Obj]) -> None:
    """Egress of every service: DNS, Kafka, and its generated dials-<name> policy exactly when it is
    configured to dial a Service (the gateway: moderation, for its fail-closed health watch; the
    conversation service: postgres; web: the gateway and moderation). PostgreSQL itself: DNS only.
    This test once asserted Kafka and DNS only, the rule that refused every Chat (issue 16)."""
    dialers = {d.source.owner for d in connectivity.dials(docs)
               if connectivity.resolve(docs, d).what.startswith("Service/")}
    assert {"StatefulSet/gateway", "StatefulSet/conversation", "Deployment/web"} <= dialers
    workloads = [("StatefulSet", sts) for sts in manifests.by_kind(docs, "StatefulSet").values()]
    workloads.append(("Deployment", manifests.by_kind(docs, "Deployment")["web"]))
    for kind, workload in workloads:
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        names = {p["metadata"]["name"] for p in _applying(docs, labels, "Egress")}
        kafka = {"kafka-clients"} if labels.get("colloquy.io/kafka-client") == "true" else set()
        expected = {"default-deny", "allow-dns"} | kafka | (
            {f"{sync.DIALS_PREFIX}{name}"} if f"{kind}/{name}" in dialers else set())
        assert names == expected, (name, names)
    kafka = _policies(docs)["kafka-clients"]["spec"]["egress"]
    assert kafka == [{"to": [{"podSelector": {"matchLabels": {"strimzi.io/cluster": "colloquy",
                                                              "strimzi.io/kind": "Kafka"}}}],
                      "ports": [{"protocol": "TCP", "port": 9093}]}]


def test_address_based_egress_is_opt_in(docs: list[Obj]) -> None:
    opt_in = {"colloquy.io/egress-apiserver", "colloquy.io/egress-internet"}
    for name, pol in _policies(docs).items():
        for rule in pol["spec"].get("egress", []):
            if any("ipBlock" in peer for peer in rule.get("to", [])):
                assert set(pol["spec"]["podSelector"].get("matchLabels", {})) <= opt_in and \
                    pol["spec"]["podSelector"].get("matchLabels"), name
                assert rule.get("ports"), f"{name}: ipBlock egress without ports"


def test_kafka_client_label_matches_kafka_credentials(objects: list[Obj]) -> None:
    users = {o["metadata"]["name"] for o in objects if o["kind"] == "KafkaUser"}
    for pt in manifests.all_pod_templates(objects):
        env_users = {e.get("value") for c in pt.containers() for e in c.get("env", [])
                     if e["name"] == "KAFKA_SASL_USERNAME"}
        is_client = pt.labels.get("colloquy.io/kafka-client") == "true"
        assert is_client == bool(env_users), f"{pt.owner}: kafka-client label vs KAFKA_SASL_USERNAME"
        assert env_users <= users, f"{pt.owner}: unknown KafkaUser {env_users - users}"
        for c in pt.containers():
            env = {e["name"]: e for e in c.get("env", [])}
            if "KAFKA_SASL_USERNAME" in env:
                secret = env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert secret == {"name": env["KAFKA_SASL_USERNAME"]["value"], "key": "password"}, pt.owner


def test_prometheus_may_scrape_every_metrics_port(docs: list[Obj]) -> None:
    scrape = _policies(docs)["prometheus-scrape"]["spec"]
    allowed = {p["port"] for rule in scrape["ingress"] for p in rule["ports"]}
    for pt in manifests.all_pod_templates(docs):
        for c in pt.containers():
            for port in c.get("ports", []):
                if port.get("name", "").endswith("metrics"):
                    assert port["name"] in allowed, f"{pt.owner}: {port['name']}"


@pytest.mark.parametrize("app", ["generation", "rlhf"])
def test_ray_clusters_talk_only_among_themselves(render, app: str) -> None:  # type: ignore[no-untyped-def]
    pol = _policies(render("prod"))[f"ray-{app}-cluster"]["spec"]
    same = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": app}}}]
    assert pol["ingress"] == [{"from": same}] and pol["egress"] == [{"to": same}]


# -- The Pushgateway: the RLHF job pushes, Prometheus scrapes ------------------------------------


def _port_matches(rule_port: Any, number: int, name: str) -> bool:
    return rule_port.get("port") in (number, name)


def _peer_selects(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    # Same-namespace pod peers only (a namespaceSelector would widen the peer beyond colloquy).
    return "namespaceSelector" not in peer and "ipBlock" not in peer and \
        manifests.selects(peer.get("podSelector"), labels)


def _flow_allowed(docs: list[Obj], src: dict[str, str], dst: dict[str, str], number: int, name: str) -> bool:
    """Both ends admit src -> dst:port: an egress rule for src and an ingress rule for dst."""
    def admits(policies: list[Obj], direction: str, key: str, peer_labels: dict[str, str]) -> bool:
        for pol in policies:
            for rule in pol["spec"].get(direction, []):
                peers_ok = not rule.get(key) or any(_peer_selects(p, peer_labels) for p in rule[key])
                ports_ok = not rule.get("ports") or any(_port_matches(p, number, name) for p in rule["ports"])
                if peers_ok and ports_ok:
                    return True
        return False

    return admits(_applying(docs, src, "Egress"), "egress", "to", dst) and \
        admits(_applying(docs, dst, "Ingress"), "ingress", "from", src)


def _pushgateway(docs: list[Obj]) -> tuple[PodTemplate, int]:
    (pt,) = [p for p in manifests.all_pod_templates(docs) if p.owner == "Deployment/pushgateway"]
    (port,) = [p["containerPort"] for c in pt.containers() for p in c["ports"] if p["name"] == "metrics"]
    return pt, port


def test_pushgateway_is_deployed_and_scraped_with_the_pushed_labels(docs: list[Obj]) -> None:
    pt, port = _pushgateway(docs)
    (c,) = pt.containers()
    assert c["image"].split("@")[0].rsplit(":", 1)[0].endswith("prom/pushgateway")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("metrics", port)
    assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    (sm,) = [s for s in manifests.by_kind(docs, "ServiceMonitor").values()
             if s["metadata"]["name"] == "pushgateway"]
    assert all(e.get("honorLabels") is True for e in sm["spec"]["endpoints"])
    scrape = _policies(docs)["prometheus-scrape"]["spec"]
    assert manifests.selects(scrape["podSelector"], pt.labels)


def test_rlhf_job_and_janitor_push_to_the_pushgateway_and_only_they_may(objects: list[Obj]) -> None:
    from urllib.parse import urlparse

    docs = [o for o in objects if o["kind"] != "RayJob"]
    pt, port = _pushgateway(docs)
    service = manifests.by_kind(docs, "Service")["pushgateway"]
    rlhf_pods = [p for p in manifests.all_pod_templates(objects) if p.owner.startswith("RayJob/")]
    assert rlhf_pods
    # The head (job.py) and the rank-0 training worker (train.py) both push.
    for rlhf in rlhf_pods:
        assert _flow_allowed(docs, rlhf.labels, pt.labels, port, "metrics"), rlhf.owner
    # The job is told where: the Service, on its port.
    url = urlparse(manifests.by_kind(docs, "ConfigMap")["rlhf-config"]["data"]["PUSHGATEWAY_URL"])
    assert url.hostname == service["metadata"]["name"]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    # The hanging-transaction janitor pushes too (a one-shot Job has no scrape endpoint).
    janitor = [p for p in manifests.all_pod_templates(docs)
               if p.labels.get("app.kubernetes.io/name") == "kafka-txn-janitor"]
    assert janitor and all(_flow_allowed(docs, j.labels, pt.labels, port, "metrics") for j in janitor)
    # Nothing else in the namespace may push (or delete) metrics.
    for other in manifests.all_pod_templates(docs):
        if other.owner != pt.owner and other not in janitor:
            assert not _flow_allowed(docs, other.labels, pt.labels, port, "metrics"), other.owner
