"""A real gateway process on free ports, for tests of its public behaviour (Kafka must run).

Without MODERATION_ADDR it admits chats whether or not the rest of the pipeline runs, so the
admission and rate-limit checks are seen alone.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator

from devtools.procs import Proc, free_port
from services.common.health_probe import serving


class Gateway:
    def __init__(self, bootstrap: str, env: dict[str, str] | None = None, instance: str = "") -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.instance = instance or f"gwt{uuid.uuid4().hex[:8]}"
        self.env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INSTANCE_ID": self.instance,
                    "GRPC_PORT": str(self.port), "METRICS_PORT": str(self.metrics_port),
                    "SHUTDOWN_GRACE_SECONDS": "5", **(env or {})}
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> Gateway:
        self.proc = Proc("services.gateway", self.env)
        self.proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=timeout)
        # Health is SERVING once its conversation store is reachable and caught up.
        deadline = time.monotonic() + timeout
        while not serving(self.address):
            assert self.proc.popen.poll() is None and time.monotonic() < deadline, (
                f"the gateway never became SERVING:\n{self.proc.output()[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.popen.poll() is None:
            self.proc.signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()

    def metric(self, name: str) -> float:
        """One unlabelled sample from its /metrics page (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def running_gateway(bootstrap: str, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    gw = Gateway(bootstrap, env).start()
    try:
        yield gw
    finally:
        gw.stop()
