"""TLS for every gRPC endpoint behind one switch: `TLS_DIR`.

The directory has the layout of a Kubernetes TLS Secret made by cert-manager: `tls.crt`, `tls.key`
and `ca.crt`. With it set, every service serves TLS; internal services also *require* a client
certificate signed by `ca.crt` (mutual TLS between services), while the public gateway does not
(`TLS_CLIENT_AUTH=none` in its defaults: outside callers authenticate with API keys). Internal
clients (the gateway's moderation check, health probes) present `tls.crt` from the same directory.
Without `TLS_DIR` everything is plaintext, as on a developer machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from services.common.config import ConfigError

CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"


def _read(tls_dir: str, name: str) -> bytes:
    path = Path(tls_dir) / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"TLS_DIR={tls_dir!r}: cannot read {name} ({exc.strerror})") from None


def server_credentials(tls_dir: str, client_auth: str) -> grpc.ServerCredentials:
    """`client_auth`: "require" (mutual TLS) or "none" (server-side TLS only)."""
    pair = [(_read(tls_dir, KEY), _read(tls_dir, CERT))]
    if client_auth == "require":
        return grpc.ssl_server_credentials(pair, root_certificates=_read(tls_dir, CA),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(tls_dir: str) -> grpc.ChannelCredentials:
    """Trust `ca.crt` and present `tls.crt` (accepted by servers that require client certs)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_dir, CA),
                                        private_key=_read(tls_dir, KEY), certificate_chain=_read(tls_dir, CERT))


def env_tls_dir() -> str:
    return os.environ.get("TLS_DIR", "")


def insecure_or_secure_channel(target: str, tls_dir: str | None = None, aio: bool = False,
                               options: list[tuple[str, int]] | None = None) -> grpc.Channel | grpc.aio.Channel:
    """A channel to another Colloquy service that follows the TLS switch."""
    tls_dir = env_tls_dir() if tls_dir is None else tls_dir
    mod = grpc.aio if aio else grpc
    if not tls_dir:
        return mod.insecure_channel(target, options=options)
    return mod.secure_channel(target, channel_credentials(tls_dir), options=options)
