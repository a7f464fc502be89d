"""TLS behind one switch: prod turns it on for every gRPC service, dev stays plaintext.

The services' switch is TLS_DIR (services/common/tls.py: a directory with tls.crt, tls.key and
ca.crt, the layout of a cert-manager TLS Secret). In prod each gRPC service mounts its Secret
`<service>-tls` there; internal services require client certificates (mutual TLS), the gateway
does not. Kubelet's native gRPC probes speak plaintext only, so prod probes are exec probes running
services.common.health_probe, which follows the same switch. The last tests run that probe, as
the manifests give it, against a TLS server using certificates from scripts/k8s-tls.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devtools.k8s import manifests
from devtools.k8s.manifests import Obj
from services.common import tls
from tests.k8s import test_config_keys

GRPC_SERVICES = test_config_keys.GRPC_SERVICES
# Pods that serve no gRPC but dial the services': web (the HTTP front) calls the gateway and
# moderation, the RLHF job's head moderation (its replay evaluation); they serve TLS in prod, so
# each gets the switch and a Secret of its own.
GRPC_CLIENTS = ("web", "rlhf")
# Secrets prod mounts that scripts/k8s-tls.sh does not make yet (create them with cert-manager or
# openssl meanwhile: k8s/README.md "TLS"). Remove an entry once the script's SERVICES has it.
NOT_YET_SCRIPTED: set[str] = set()
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_MODULE = "services.common.health_probe"
SCRIPT = manifests.ROOT / "scripts" / "k8s-tls.sh"


def _service(docs: list[Obj], name: str) -> tuple[manifests.PodTemplate, dict[str, Any], dict[str, str]]:
    pt, container, env = test_config_keys._target_env(docs, test_config_keys.targets(name)[0])
    return pt, container, test_config_keys.resolve(env)


def _with_embedded(docs: list[Obj]) -> list[Obj]:
    """The render plus the RLHF RayJob template it carries as data (the rlhf client's pods)."""
    return docs + manifests.embedded_objects(docs)


def _grpc_port(container: dict[str, Any]) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_prod_serves_tls_from_the_mounted_secret(render, service: str) -> None:  # type: ignore[no-untyped-def]
    pt, container, env = _service(render("prod"), service)
    tls_dir = env.get("TLS_DIR", "")
    assert tls_dir, f"{service}: TLS_DIR is not set in prod"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == tls_dir]
    assert mount.get("readOnly") is True and "subPath" not in mount  # a renewed Secret reaches the files
    volume = next(v for v in pt.spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == f"{service}-tls"
    assert "items" not in volume["secret"], "tls.crt, tls.key and ca.crt are all needed"
    # The gateway is the public entrance (API keys, no client certificates); the rest is mutual TLS.
    assert env["TLS_CLIENT_AUTH"] == ("none" if service == "gateway" else "require")


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_prod_probes_speak_tls(render, service: str) -> None:  # type: ignore[no-untyped-def]
    _, container, _ = _service(render("prod"), service)
    port = _grpc_port(container)
    for name in PROBES:
        probe = container[name]
        assert "grpc" not in probe, f"{service} {name}: a native gRPC probe cannot do TLS"
        assert probe["exec"]["command"] == ["python", "-m", PROBE_MODULE, f"127.0.0.1:{port}"], (service, name)
        # A Python start per probe: give it time, and do not run it every other second.
        assert probe.get("timeoutSeconds", 1) >= 5 and probe.get("periodSeconds", 10) >= 3, (service, name)


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_dev_stays_plaintext(render, service: str) -> None:  # type: ignore[no-untyped-def]
    pt, container, env = _service(render("dev"), service)
    assert env.get("TLS_DIR", "") == ""
    assert not [v for v in pt.spec["volumes"] if v.get("secret", {}).get("secretName", "").endswith("-tls")]
    for name in PROBES:
        assert container[name]["grpc"]["port"] == _grpc_port(container)


def test_only_the_grpc_services_get_the_switch(render) -> None:  # type: ignore[no-untyped-def]
    """TLS_DIR is per pod (not in colloquy-common): pods without the Secret must not point at it."""
    for overlay in manifests.OVERLAYS:
        docs = _with_embedded(render(overlay))
        assert manifests.by_kind(docs, "ConfigMap")["colloquy-common"]["data"]["TLS_DIR"] == ""
        for pt in manifests.all_pod_templates(docs):
            for c in pt.containers():
                if any(e["name"] == "TLS_DIR" for e in c.get("env", [])):
                    name = pt.owner.split("/")[1].removesuffix("-*:head")  # RayJob/rlhf-*:head
                    assert name in GRPC_SERVICES + GRPC_CLIENTS, pt.owner


@pytest.mark.parametrize("client", GRPC_CLIENTS)
def test_prod_grpc_clients_dial_tls_from_their_mounted_secret(render, client: str) -> None:  # type: ignore[no-untyped-def]
    """web's channels follow TLS_DIR (tls.insecure_or_secure_channel): in prod it must point at a
    mounted <client>-tls Secret (moderation requires a client certificate); dev stays plaintext."""
    (target,) = test_config_keys.targets(client)
    pt, container, env = test_config_keys._target_env(_with_embedded(render("prod")), target)
    tls_dir = test_config_keys.resolve(env).get("TLS_DIR", "")
    assert tls_dir, f"{client}: TLS_DIR is not set in prod"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == tls_dir]
    assert mount.get("readOnly") is True and "subPath" not in mount
    volume = next(v for v in pt.spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == f"{client}-tls" and "items" not in volume["secret"]
    pt, _, env = test_config_keys._target_env(_with_embedded(render("dev")), target)
    assert test_config_keys.resolve(env).get("TLS_DIR", "") == ""
    assert not [v for v in pt.spec["volumes"] if v.get("secret", {}).get("secretName", "").endswith("-tls")]


def test_the_script_makes_the_secrets_prod_mounts(render) -> None:  # type: ignore[no-untyped-def]
    mounted = {v["secret"]["secretName"] for pt in manifests.all_pod_templates(_with_embedded(render("prod")))
               for v in pt.spec.get("volumes", []) if v.get("secret", {}).get("secretName", "").endswith("-tls")}
    text = SCRIPT.read_text(encoding="utf-8")
    services = text.split("readonly SERVICES=(", 1)[1].split(")", 1)[0].split()
    assert mounted == {f"{s}-tls" for s in GRPC_SERVICES + GRPC_CLIENTS}
    scripted = {f"{s}-tls" for s in services}
    assert not scripted & NOT_YET_SCRIPTED, "the script makes these now: drop them from NOT_YET_SCRIPTED"
    assert scripted == mounted - NOT_YET_SCRIPTED


# -- The probe against a real TLS server, with the script's certificates ------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    out = tmp_path_factory.mktemp("k8s-tls")
    subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(out), "APPLY": "0"},
                   check=True, capture_output=True, timeout=60)
    return out


def _serve(tls_dir: Path, client_auth: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    # Bound like the services (GRPC_HOST=0.0.0.0), dialled at 127.0.0.1 like the exec probes.
    port = server.add_secure_port("0.0.0.0:0", tls.server_credentials(str(tls_dir), client_auth))
    server.start()
    return server, port


def _probe(tls_dir: Path | None, port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TLS_DIR"}
    if tls_dir is not None:
        env["TLS_DIR"] = str(tls_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(manifests.ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", PROBE_MODULE, f"127.0.0.1:{port}"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=manifests.ROOT)


@pytest.mark.parametrize("service", ["tokenizer", "gateway"])
def test_exec_probe_passes_against_mutual_tls(certs: Path, service: str) -> None:
    server, port = _serve(certs / service, "none" if service == "gateway" else "require")
    try:
        ok = _probe(certs / service, port)
        assert ok.returncode == 0, ok.stderr
        # Without the switch the probe speaks plaintext, and a TLS server refuses it.
        assert _probe(None, port).returncode == 1
    finally:
        server.stop(None)


def test_a_client_without_a_certificate_is_refused(certs: Path) -> None:
    server, port = _serve(certs / "moderation", "require")
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        server.stop(None)


def test_gateway_reaches_moderation_by_its_service_name(certs: Path) -> None:
    """The gateway's moderation check dials MODERATION_ADDR (moderation:50053) with its own
    certificate: moderation's certificate must carry that name, and accept the gateway's."""
    server, port = _serve(certs / "moderation", "require")
    try:
        options = [("grpc.ssl_target_name_override", "moderation")]
        with grpc.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(str(certs / "gateway")),
                                 options=options) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)
