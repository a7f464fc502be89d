"""Web front configuration (environment variables; docs/configuration.md)."""

from __future__ import annotations

import dataclasses

from services.common.config import env, positive
from services.common.config import port as tcp_port  # `port` is a field name below


@dataclasses.dataclass(frozen=True)
class WebConfig:
    host: str = env("WEB_HOST", "127.0.0.1")
    # The public port: the API, the page, /healthz and /readyz.
    port: int = env("WEB_PORT", 8080, check=tcp_port, hint="a TCP port 0..65535")
    # Prometheus /metrics, on a port of its own like every service's (not reachable from outside).
    metrics_port: int = env("METRICS_PORT", 9108, check=tcp_port, hint="a TCP port 0..65535")
    gateway_addr: str = env("GATEWAY_ADDR", "127.0.0.1:50051")
    moderation_addr: str = env("MODERATION_ADDR", "127.0.0.1:50053")
    # The gateway's key file: /v1/models and /v1/moderations check keys with it (chat calls are
    # checked by the gateway itself, which gets the caller's key forwarded).
    api_keys_file: str = env("API_KEYS_FILE", "deploy/dev/api-keys.yaml")
    # The id clients name in `model`; the registry's served version is accepted as well.
    model_id: str = env("WEB_MODEL_ID", "colloquy", check=lambda v: bool(v.strip()), hint="a non-empty name")
    max_body_bytes: int = env("WEB_MAX_BODY_BYTES", 1 << 20, check=lambda v: v >= 1024, hint="bytes >= 1024")
    # How long a moderation or readiness call may take; chat calls run under the gateway's deadline.
    call_timeout_s: float = env("WEB_CALL_TIMEOUT_SECONDS", 30.0, check=positive, hint="seconds > 0")
    grace_seconds: float = env("SHUTDOWN_GRACE_SECONDS", 20.0, check=positive, hint="seconds > 0")
    log_level: str = env("LOG_LEVEL", "INFO", check=lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
                         hint="DEBUG, INFO, WARNING or ERROR")
