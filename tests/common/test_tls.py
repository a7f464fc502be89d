"""The TLS switch (TLS_DIR) on a real gRPC server: TLS, mutual TLS, and plaintext refused.

The test makes its own CA and certificates (never committed), in cert-manager's Secret layout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import signal
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtools.procs import Proc, free_port
from services.common import health_probe, tls


def _cert(subject: str, issuer_key, issuer_name: x509.Name | None, key, ca: bool) -> x509.Certificate:  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:  # type: ignore[no-untyped-def]
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two TLS dirs sharing one CA (a service's and a client's), and a stranger's from another CA."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("colloquy-test-ca", ca_key, None, ca_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert("someone-else", other_key, None, other_key, ca=True)
    dirs = {}
    for name, (issuer, issuer_key) in {"server": (ca, ca_key), "client": (ca, ca_key),
                                       "stranger": (other_ca, other_key)}.items():
        key = ec.generate_private_key(ec.SECP256R1())
        d = root / name
        d.mkdir()
        (d / tls.CERT).write_bytes(_pem(_cert(f"colloquy-{name}", issuer_key, issuer.subject, key, ca=False)))
        (d / tls.KEY).write_bytes(_pem(key))
        (d / tls.CA).write_bytes(_pem(ca))  # everyone trusts the real CA for the server's cert
        dirs[name] = d
    return dirs


def _start(tls_dir: Path, client_auth: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc("tests.common.sample_server", {"GRPC_PORT": str(port), "METRICS_PORT": str(free_port()),
                                               "TLS_DIR": str(tls_dir), "TLS_CLIENT_AUTH": client_auth})
    proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=30)
    return proc, port


def _count(channel: grpc.Channel) -> list[int]:
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    return list(stub.CountTokens(tokenizer_pb2.CountTokensRequest(texts=["a b c"]), timeout=5).counts)


def test_mutual_tls_between_services(pki: dict[str, Path]) -> None:
    proc, port = _start(pki["server"], "require")
    target = f"127.0.0.1:{port}"
    try:
        with tls.insecure_or_secure_channel(target, str(pki["client"])) as ch:
            assert _count(ch) == [3]
        with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as plain:
            _count(ch)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        no_cert = grpc.ssl_channel_credentials(root_certificates=(pki["client"] / tls.CA).read_bytes())
        with grpc.secure_channel(target, no_cert) as ch, pytest.raises(grpc.RpcError) as anonymous:
            _count(ch)
        assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls.insecure_or_secure_channel(target, str(pki["stranger"])) as ch, pytest.raises(grpc.RpcError):
            _count(ch)  # a certificate from another CA is refused
        assert health_probe.serving(target) is False  # the probe follows TLS_DIR (unset here)
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_server_tls_without_client_certificates(pki: dict[str, Path]) -> None:
    """The gateway's mode: TLS, callers need only trust the CA (they authenticate with API keys)."""
    proc, port = _start(pki["server"], "none")
    try:
        ca_only = grpc.ssl_channel_credentials(root_certificates=(pki["client"] / tls.CA).read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", ca_only) as ch:
            assert _count(ch) == [3]
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_missing_certificate_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    proc = Proc("tests.common.sample_server", {"GRPC_PORT": str(free_port()), "TLS_DIR": str(tmp_path)})
    assert proc.wait(30) != 0
    assert "TLS_DIR" in proc.output() and "tls.key" in proc.output()
