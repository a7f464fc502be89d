"""The one table of Colloquy's local services: name, module, ports, and the env that wires them.

`scripts/stack.sh` (through this module's CLI), the test harness (`devtools.stack`) and the
benchmarks read it, so a service is added in one place: one `Service(...)` row in `SERVICES`.

    python -m devtools.services table      one line per service: name module port metrics-port probe
    python -m devtools.services env NAME   NAME's wiring env (KEY=VALUE lines) for the local ports

Ports are the local defaults (the same as each service's config DEFAULTS); `<NAME>_PORT` in the
environment moves a service (e.g. GATEWAY_PORT=50061), and its peers then dial the moved port.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Service:
    name: str
    module: str  # run as `python -m <module>`
    port: int  # local default of the port it serves on
    metrics_port: int  # local default of its Prometheus port (/metrics)
    port_vars: tuple[str, ...] = ("GRPC_PORT",)  # the env variables its serving port is read from
    peers: tuple[tuple[str, str], ...] = ()  # (env variable, service) for each address it dials
    http: bool = False  # probed at http://.../readyz; otherwise grpc.health.v1 on `port`

    @property
    def port_env(self) -> str:
        """The variable that moves this service in a local stack (`scripts/stack.sh up`)."""
        return f"{self.name.upper()}_PORT"

    def local_port(self, environ: Mapping[str, str] = os.environ) -> int:
        return int(environ.get(self.port_env, self.port))

    def local_metrics_port(self, environ: Mapping[str, str] = os.environ) -> int:
        return self.metrics_port

    def wiring(self, port_of: Callable[[str], int], metrics_port: int) -> dict[str, str]:
        """The env that puts this service on `port_of(self.name)` and points it at its peers."""
        port = port_of(self.name)
        env = dict.fromkeys(self.port_vars, str(port))
        env["METRICS_PORT"] = str(metrics_port)
        for var, peer in self.peers:
            env[var] = f"127.0.0.1:{port_of(peer)}"
        return env


# Start order. Generation (Ray) comes first and starts alone: on 2 cores its raylet gives up
# waiting for its metrics agent when the other services import their dependencies meanwhile.
SERVICES: tuple[Service, ...] = (
    Service("generation", "services.generation", 9000, 9105, port_vars=("GRPC_PORT", "GENERATION_GRPC_PORT")),
    # The conversation store's materializer before its readers (prompt, gateway), which stay
    # NOT_SERVING until it has caught up with conversation.turns.
    Service("conversation", "services.conversation", 50056, 9107),
    Service("tokenizer", "services.tokenizer", 50052, 9102),
    Service("moderation", "services.moderation", 50053, 9103),
    Service("prompt", "services.prompt", 50054, 9104),
    Service("feedback", "services.feedback", 50055, 9106),
    Service("gateway", "services.gateway", 50051, 9101, peers=(("MODERATION_ADDR", "moderation"),)),
    Service("web", "services.web", 8080, 9108, port_vars=("WEB_PORT",), http=True,
            peers=(("GATEWAY_ADDR", "gateway"), ("MODERATION_ADDR", "moderation"))),
)
BY_NAME: dict[str, Service] = {s.name: s for s in SERVICES}
ORDER: list[str] = [s.name for s in SERVICES]
MODULES: dict[str, str] = {s.name: s.module for s in SERVICES}


def local_wiring(name: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`name`'s wiring env in the local stack (scripts/stack.sh): default ports unless moved."""
    svc = BY_NAME[name]
    return svc.wiring(lambda n: BY_NAME[n].local_port(environ), svc.local_metrics_port(environ))


def main(argv: list[str]) -> int:
    if argv == ["table"]:
        for s in SERVICES:
            print(s.name, s.module, s.local_port(), s.local_metrics_port(), "http" if s.http else "grpc")
        return 0
    if len(argv) == 2 and argv[0] == "env" and argv[1] in BY_NAME:
        for key, value in local_wiring(argv[1]).items():
            print(f"{key}={value}")
        return 0
    print(f"usage: python -m devtools.services table | env {{{','.join(ORDER)}}}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
