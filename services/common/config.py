"""Configuration from environment variables, validated at startup.

A small dataclass-based loader instead of pydantic-settings: we want the error to name the
*environment variable* (not a field path) and the process to stop before it serves anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def env(
    name: str,
    default: Any = dataclasses.MISSING,
    *,
    check: Callable[[Any], bool] | None = None,
    hint: str = "",
) -> Any:
    """Declare a config field read from environment variable `name`.

    `check` validates the parsed value; `hint` says what a valid value looks like.
    """
    meta = {"env": name, "check": check, "hint": hint}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, kw_only=True)
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, kw_only=True)
    return dataclasses.field(default=default, metadata=meta, kw_only=True)


def _parse(raw: str, typ: Any) -> Any:
    if typ is bool:
        low = raw.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true/false")
    if typ is int:
        return int(raw.strip())
    if typ is float:
        return float(raw.strip())
    if typ in (list[str], tuple[str, ...]):
        return [p.strip() for p in raw.split(",") if p.strip()]
    return raw


def load(cls: type[T], environ: Mapping[str, str] | None = None,
         defaults: Mapping[str, str] | None = None) -> T:
    """Build config dataclass `cls` from the environment, raising ConfigError on a bad value.

    `defaults` gives per-service fallbacks for shared fields (e.g. each service's own GRPC_PORT).
    """
    environ = os.environ if environ is None else environ
    if defaults:
        environ = {**defaults, **environ}
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = f.metadata.get("env")
        if var is None:
            continue
        typ = hints[f.name]
        if var in environ:
            raw = environ[var]
            try:
                value = _parse(raw, typ)
            except ValueError as exc:
                raise ConfigError(
                    f"{var}={raw!r} is not a valid {getattr(typ, '__name__', typ)}"
                    f"{': ' + f.metadata['hint'] if f.metadata['hint'] else ''} ({exc})"
                ) from None
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{var} is required but not set")
        _check(f, value)
        values[f.name] = value
    return cls(**values)


def _check(f: dataclasses.Field, value: Any) -> None:
    check = f.metadata.get("check")
    if check is not None and not check(value):
        hint = f.metadata["hint"] or "see docs/configuration.md"
        raise ConfigError(f"{f.metadata['env']}={value!r} is out of range: {hint}")


def validate(obj: Any) -> None:
    """Apply every env() field's check to a config built in code (`load` checks what it reads),
    so a value set by a test or a benchmark is held to the same bounds, named by its variable."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("env") is not None:
            _check(f, getattr(obj, f.name))


def load_or_exit(cls: type[T], defaults: Mapping[str, str] | None = None) -> T:
    """Load config; on error print one clear line and exit with status 2 (before serving)."""
    try:
        return load(cls, defaults=defaults)
    except ConfigError as exc:
        exit_config_error(exc)


def exit_config_error(exc: Exception) -> NoReturn:
    """Print `configuration error: ...` on one line and exit 2, before anything is served."""
    print(f"configuration error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def port(value: int) -> bool:
    """Validator for TCP ports (0 lets the OS choose, used by tests)."""
    return 0 <= value <= 65535


def positive(value: float) -> bool:
    return value > 0


@dataclasses.dataclass(frozen=True)
class KafkaConfig:
    """How every service reaches Kafka."""

    bootstrap_servers: str = env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    # How long the broker holds a fetch when there is *nothing* to return (it answers as soon as a
    # record is readable, fetch_min_bytes=1), so it costs no latency while records flow. Too short,
    # and every idle consumer polls the broker many times a second for nothing; kafka-python's 500 ms
    # default delays the first record after a quiet spell at every hop. The measurements behind 100 ms
    # are in bench/results/README.md ("Measurements moved out of code comments").
    fetch_max_wait_ms: int = env("KAFKA_FETCH_MAX_WAIT_MS", 100, check=lambda v: 0 <= v <= 1000,
                                 hint="0..1000 milliseconds")
    max_poll_records: int = env("KAFKA_MAX_POLL_RECORDS", 64, check=lambda v: 1 <= v <= 10000,
                                hint="1..10000")
    max_retries: int = env("KAFKA_MAX_RETRIES", 3, check=lambda v: 0 <= v <= 100, hint="0..100")
    retry_backoff_ms: int = env("KAFKA_RETRY_BACKOFF_MS", 100, check=lambda v: 0 <= v <= 60000,
                                hint="0..60000 milliseconds")
    create_topics: bool = env("KAFKA_CREATE_TOPICS", True)
    # A stage's transaction: the coordinator aborts one open longer than this. A stage commits
    # what it has done once a batch has run for the budget (0: a third of the timeout), so a
    # backlog of expensive records is committed in parts instead of timing out and being redone.
    transaction_timeout_ms: int = env("KAFKA_TRANSACTION_TIMEOUT_MS", 20_000,
                                      check=lambda v: 1000 <= v <= 900_000, hint="1000..900000 milliseconds")
    batch_time_budget_ms: int = env("KAFKA_BATCH_TIME_BUDGET_MS", 0, check=lambda v: v >= 0,
                                    hint="milliseconds >= 0, at most half of KAFKA_TRANSACTION_TIMEOUT_MS")
    # How long an output topic found writable is trusted before a stage asks the broker again
    # (a deleted reply topic is found by the next check, or by a send that does not complete).
    output_check_ttl_ms: int = env("KAFKA_OUTPUT_CHECK_TTL_MS", 1000, check=lambda v: 0 <= v <= 3_600_000,
                                   hint="0..3600000 milliseconds")
    # Hanging-transaction sweeps (services/common/transactions.py): 0 turns them off (k8s runs
    # them as a CronJob with its own Kafka user). The age must well exceed a batch's transaction.
    hanging_txn_check_s: float = env("KAFKA_HANGING_TXN_CHECK_S", 30.0, check=lambda v: v >= 0, hint="seconds >= 0")
    hanging_txn_age_s: float = env("KAFKA_HANGING_TXN_AGE_S", 120.0, check=lambda v: v >= 1, hint="seconds >= 1")
    # Security: PLAINTEXT locally; SASL_SSL with SCRAM-SHA-512 against Strimzi on Kubernetes.
    security_protocol: str = env("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
                                 check=lambda v: v in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"},
                                 hint="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: str = env("KAFKA_SASL_MECHANISM", "",
                              check=lambda v: v in {"", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"},
                              hint="empty, PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str = env("KAFKA_SASL_USERNAME", "")
    sasl_password: str = env("KAFKA_SASL_PASSWORD", "")
    ssl_cafile: str = env("KAFKA_SSL_CAFILE", "")

    def __post_init__(self) -> None:
        if self.batch_time_budget_ms * 2 > self.transaction_timeout_ms:
            raise ConfigError(f"KAFKA_BATCH_TIME_BUDGET_MS={self.batch_time_budget_ms} is out of range: at most half"
                              f" of KAFKA_TRANSACTION_TIMEOUT_MS ({self.transaction_timeout_ms})")

    @property
    def batch_budget_s(self) -> float:
        """How long a stage works on a batch before it commits what it has done."""
        return (self.batch_time_budget_ms or self.transaction_timeout_ms / 3) / 1000

    def client_kwargs(self) -> dict:
        """Connection settings every kafka-python client (producer, consumer, admin) takes."""
        kw: dict = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            kw["ssl_cafile"] = self.ssl_cafile
        return kw


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """gRPC + metrics endpoints of one service."""

    host: str = env("GRPC_HOST", "127.0.0.1")
    grpc_port: int = env("GRPC_PORT", 0, check=port, hint="a TCP port 0..65535")
    metrics_port: int = env("METRICS_PORT", 0, check=port, hint="a TCP port 0..65535")
    grace_seconds: float = env("SHUTDOWN_GRACE_SECONDS", 20.0, check=positive, hint="seconds > 0")
    max_message_bytes: int = env("GRPC_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, check=lambda v: v >= 1024,
                                 hint="bytes >= 1024")
    # Read through `instance()`, never directly: it names Kafka static members, transactional ids
    # and the gateway's reply topic, so it must be a valid topic-name part.
    instance_id: str = env("INSTANCE_ID", "", check=lambda v: re.fullmatch(r"[A-Za-z0-9._-]{0,200}", v) is not None,
                           hint="letters, digits, '.', '_' and '-', at most 200")
    # The TLS switch (services/common/tls.py): a directory with tls.crt, tls.key and ca.crt.
    tls_dir: str = env("TLS_DIR", "")
    # With TLS: "require" a client certificate signed by ca.crt (mutual TLS), or "none".
    tls_client_auth: str = env("TLS_CLIENT_AUTH", "require", check=lambda v: v in {"require", "none"},
                               hint="require or none")
    log_level: str = env("LOG_LEVEL", "INFO", check=lambda v: v.upper() in
                         {"DEBUG", "INFO", "WARNING", "ERROR"}, hint="DEBUG, INFO, WARNING or ERROR")

    def instance(self) -> str:
        """This replica's id: INSTANCE_ID, else `<hostname>-<port>` (GRPC_PORT, or METRICS_PORT
        for a service without one).

        Why the port: two replicas on one host cannot listen on one port, so the id is unique
        per replica; a restarted replica listens on its port again, so the id is stable, and it
        takes back its transactional id (fencing its own dead predecessor, not a live sibling)
        and its reply topic. With both ports 0 (chosen by the OS) there is no stable id to
        derive: INSTANCE_ID is then required.
        """
        if self.instance_id:
            return self.instance_id
        port = self.grpc_port or self.metrics_port
        if not port:
            raise ConfigError("INSTANCE_ID is required when GRPC_PORT and METRICS_PORT are 0 "
                              "(a replica id is derived from the host name and a fixed port)")
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:180] or "host"
        return f"{host}-{port}"
