"""Start, probe and stop the project's real local Kafka broker from tests.

The broker is a real Apache Kafka 4.x (KRaft) JVM run by ``scripts/kafka.sh``;
tests never use a mock. This module is plain functions so the test harness
(conftest, CI scripts, fault-injection tests) decides the lifecycle.

The probe speaks the Kafka wire protocol directly (a Metadata request over a
socket) so it needs no client library and works before the venv has
kafka-python, and it proves the broker *serves*, not merely that a port is
bound (KRaft opens the client listener only once the broker is unfenced).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "scripts" / "kafka.sh"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"

# Metadata v4 is the oldest version Kafka 4.x still serves (KIP-896).
_METADATA_API_KEY = 3
_METADATA_VERSION = 4
_CORRELATION_ID = 0x636F6C71  # "colq"


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """First host:port of a bootstrap list; the local broker is a single node."""
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return (host or "127.0.0.1"), int(port)


def _metadata_request() -> bytes:
    """Metadata v4: null client id, null topics (all), no auto topic creation."""
    body = struct.pack(
        ">hhihi?",  # header: api_key, api_version, correlation_id, client_id; body: topics, auto-create
        _METADATA_API_KEY,
        _METADATA_VERSION,
        _CORRELATION_ID,
        -1,  # client_id: null
        -1,  # topics: null = all topics
        False,  # allow_auto_topic_creation
    )
    return struct.pack(">i", len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def _probe_once(host: str, port: int, timeout: float) -> bool:
    """One Metadata round trip; True when the reply lists at least one broker."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_metadata_request())
            # size, correlation_id, throttle_time_ms, brokers array length
            _size, corr, _throttle, n_brokers = struct.unpack(">iiii", _recv_exactly(sock, 16))
            return corr == _CORRELATION_ID and n_brokers > 0
    except (OSError, struct.error):
        return False


def broker_is_up(bootstrap: str = DEFAULT_BOOTSTRAP, timeout: float = 2.0) -> bool:
    """True if a broker at ``bootstrap`` answers a Metadata request within ``timeout`` s.

    Retries until the deadline, so a broker that is just opening its listener
    still counts; a refused connection with no time left returns False.
    """
    host, port = _split_bootstrap(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if _probe_once(host, port, max(0.2, min(left, 2.0))):
            return True
        if time.monotonic() + 0.2 >= deadline:
            return False
        time.sleep(0.2)


def _run_kafka_sh(*args: str, bootstrap: str = DEFAULT_BOOTSTRAP, timeout: float = 300.0) -> None:
    """Run scripts/kafka.sh with KAFKA_PORT taken from ``bootstrap``; raise with its output on failure."""
    _host, port = _split_bootstrap(bootstrap)
    env = dict(os.environ, KAFKA_PORT=str(port))
    proc = subprocess.run(
        ["bash", str(KAFKA_SH), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/kafka.sh {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}")


def ensure_broker(bootstrap: str = DEFAULT_BOOTSTRAP) -> bool:
    """Make sure a broker serves at ``bootstrap``; True if this call started it.

    The return value tells the caller whether it owns the broker (and should
    ``stop_broker()`` at the end) or found one already running (a developer's,
    or another test session's) that it must leave alone.
    """
    if broker_is_up(bootstrap, timeout=1.0):
        return False
    # kafka.sh holds a lock for up/down, so concurrent callers do not race;
    # a loser of the race finds the broker up and starts nothing.
    _run_kafka_sh("up", bootstrap=bootstrap)
    if not broker_is_up(bootstrap, timeout=10.0):
        raise RuntimeError(f"scripts/kafka.sh up returned but no broker answers on {bootstrap}")
    return True


def stop_broker(bootstrap: str = DEFAULT_BOOTSTRAP) -> None:
    """Stop the broker ``scripts/kafka.sh`` started (no-op when none runs)."""
    _run_kafka_sh("down", bootstrap=bootstrap)


def release_broker(started: bool, bootstrap: str = DEFAULT_BOOTSTRAP) -> None:
    """Stop the broker if ``ensure_broker`` started it (its return value), unless
    ``COLLOQUY_KEEP_KAFKA`` is set (scripts/test.sh owns the broker's lifetime then). A benchmark
    or test session that left its broker running made the next ``make test`` use that one, whose
    data and pid file belong to another checkout (its broker-restart test then cannot restart it)."""
    if started and not os.environ.get("COLLOQUY_KEEP_KAFKA"):
        stop_broker(bootstrap)


def restart_broker(bootstrap: str = DEFAULT_BOOTSTRAP) -> None:
    """Stop and start the broker on the same data dir, for fault-tolerance tests.

    Topics, committed offsets and transaction state survive: the point is to
    check that clients reconnect and resume, not to start from scratch.
    """
    stop_broker(bootstrap)
    if broker_is_up(bootstrap, timeout=0.5):
        raise RuntimeError(f"the broker on {bootstrap} was not started by scripts/kafka.sh; cannot restart it")
    _run_kafka_sh("up", bootstrap=bootstrap)
    if not broker_is_up(bootstrap, timeout=10.0):
        raise RuntimeError(f"broker did not come back on {bootstrap}")
