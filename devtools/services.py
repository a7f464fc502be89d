"""The one table of Colloquy's local services: name, module, ports, and the env that wires them.

`scripts/stack.sh` (through this module's CLI), the test harness (`devtools.stack`) and the
benchmarks read it, so a service is added in one place: one `Service(...)` row in `SERVICES`.

    python -m devtools.services table        one line per service: name module port metrics-port probe
    python -m devtools.services processes    one line per process (REPLICAS): process service module
                                             port metrics-port probe
    python -m devtools.services env PROCESS  PROCESS's env (KEY=VALUE lines) for the local ports

Ports are the local defaults (the same as each service's config DEFAULTS); `<NAME>_PORT` in the
environment moves a service (e.g. GATEWAY_PORT=50061), and its peers then dial the moved port.

Replicas: REPLICAS="2" runs two processes of every service, REPLICAS="gateway=2 prompt=3" (or
"2 web=1") per service. Replica k (1-based) of a service is the process `<name>-<k>` (the first
keeps the plain name), on the service's ports + 100 * (k - 1) (gateway 50051, 50151, ...; metrics
9101, 9201, ...), so its replica id (INSTANCE_ID, else `<hostname>-<port>`, services/common/
runtime.py) is its own. Generation runs one process whatever is asked: its replicas are Ray
Serve's, inside it (`generation_plan`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


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
ROOT_SERVE_CONFIG = Path(__file__).resolve().parents[1] / "services" / "generation" / "serve_config.yaml"


def local_wiring(name: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`name`'s wiring env in the local stack (scripts/stack.sh): default ports unless moved."""
    svc = BY_NAME[name]
    return svc.wiring(lambda n: BY_NAME[n].local_port(environ), svc.local_metrics_port(environ))


REPLICA_PORT_STEP = 100  # replica k serves on the service's ports + 100 * (k - 1)
MAX_REPLICAS = 8  # metrics ports stay below 10000, where Ray's worker ports begin


def parse_replicas(spec: str) -> dict[str, int]:
    """Replicas per service from REPLICAS: "" (1 each), "2" (2 each), "gateway=2 prompt=3", or a
    default and exceptions ("2 web=1"); separated by spaces or commas. ValueError says what is wrong."""
    default = 1
    counts: dict[str, int] = {}
    for item in spec.replace(",", " ").split():
        name, sep, value = item.rpartition("=")
        if sep and name not in BY_NAME:
            raise ValueError(f"REPLICAS: unknown service {name!r} (one of {', '.join(ORDER)})")
        if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
            raise ValueError(f"REPLICAS: {item!r}: a replica count is a whole number 1..{MAX_REPLICAS}")
        if sep:
            counts[name] = int(value)
        else:
            default = int(value)
    return {name: counts.get(name, default) for name in ORDER}


def replica_name(service: str, index: int) -> str:
    """The process name of replica `index` (1-based): the service's name for the first."""
    return service if index == 1 else f"{service}-{index}"


def service_of(process: str) -> str:
    """The service a process name (`gateway`, `gateway-2`) is a replica of."""
    base, _, index = process.rpartition("-")
    return base if index.isdigit() and base in BY_NAME else process


def replica_index(process: str) -> int:
    """The 1-based replica number of a process name (1 for the plain service name)."""
    return 1 if service_of(process) == process else int(process.rpartition("-")[2])


def processes(counts: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """(process, service, index) in start order; generation is one process (Serve's replicas)."""
    return [(replica_name(svc, k), svc, k) for svc in ORDER
            for k in range(1, (1 if svc == "generation" else counts.get(svc, 1)) + 1)]


def peer_process(peer: str, index: int, counts: Mapping[str, int]) -> str:
    """Which replica of `peer` replica `index` of a service dials: they are dealt round the
    peer's replicas (gateway-2 -> moderation-2, or moderation with one moderation replica)."""
    n = 1 if peer == "generation" else counts.get(peer, 1)
    return replica_name(peer, (index - 1) % n + 1)


@dataclass(frozen=True)
class GenerationPlan:
    """How many Ray Serve generation replicas a stack asks for and how many the CPUs hold."""

    asked: int
    ray_cpus: int  # GENERATION_RAY_NUM_CPUS: the local Ray's CPUs, which serving.cap_replicas divides
    fits: int  # replicas those CPUs hold at the config's ray_actor_options (the cap applied at start)
    cpus_per_replica: float
    config: dict[str, Any]  # serve_config.yaml with min/initial replicas = asked (max at least that)

    @property
    def note(self) -> str:
        running = min(self.asked, self.fits)
        head = (f"generation: {self.asked} Ray Serve replicas asked, each takes {self.cpus_per_replica:g} CPUs"
                f" (ray_actor_options); Ray gets {self.ray_cpus} of this machine's {os.cpu_count()} cores")
        if running < self.asked:
            return f"{head}, which hold {max(self.fits, 0)}: {max(running, 1)} replica runs (serving.cap_replicas)"
        return f"{head}: {running} replicas run"


def generation_plan(asked: int, cores: int | None = None, base_cpus: int = 2,
                    serve_config: str | Path = ROOT_SERVE_CONFIG) -> GenerationPlan:
    """`asked` Serve replicas in one generation process: Ray gets the CPUs they need, at most the
    machine's cores (at least `base_cpus`, the stack's usual), and the config starts that many
    (min = initial = asked); serving.cap_replicas then lowers it to what those CPUs hold, so on
    a 2-core machine one replica runs rather than two splitting the cores."""
    from services.generation.serving import cap_replicas

    cores = cores or os.cpu_count() or 1
    doc = yaml.safe_load(Path(serve_config).read_text(encoding="utf-8"))
    dep = doc["applications"][0]["deployments"][0]
    per_cpu = float((dep.get("ray_actor_options") or {}).get("num_cpus", 1) or 0)
    ray_cpus = max(base_cpus, min(int(asked * per_cpu + 0.999), cores))
    auto = dep.get("autoscaling_config")
    if auto is not None:
        auto.update(min_replicas=asked, initial_replicas=asked, max_replicas=max(asked, auto.get("max_replicas", 1)))
    else:
        dep["num_replicas"] = asked
    fits = cap_replicas(yaml.safe_load(yaml.safe_dump(dep)), ray_cpus, 0).fits
    return GenerationPlan(asked, ray_cpus, fits, per_cpu, doc)


def process_env(process: str, counts: Mapping[str, int], environ: Mapping[str, str] = os.environ,
                run_dir: str | Path = "") -> dict[str, str]:
    """A process's env in the local stack (scripts/stack.sh): its replica's ports, the peer
    replicas it dials, and its own INSTANCE_ID when INSTANCE_ID is set (`<id>-<k>` for replica
    k > 1; unset, each derives `<hostname>-<port>`). For generation with more than one replica
    asked, the Serve config that asks for them is written to `run_dir`."""
    svc_name = service_of(process)
    svc = BY_NAME[svc_name]
    index = replica_index(process)
    step = REPLICA_PORT_STEP * (index - 1)

    def port_of(name: str) -> int:
        k = index if name == svc_name else replica_index(peer_process(name, index, counts))
        return BY_NAME[name].local_port(environ) + REPLICA_PORT_STEP * (k - 1)

    env = svc.wiring(port_of, svc.local_metrics_port(environ) + step)
    if environ.get("INSTANCE_ID"):
        env["INSTANCE_ID"] = replica_name(environ["INSTANCE_ID"], index)
    if svc_name == "generation" and counts.get("generation", 1) > 1:
        plan = generation_plan(counts["generation"], base_cpus=int(environ.get("GENERATION_RAY_NUM_CPUS", 2)))
        path = Path(run_dir or ".") / "generation-serve.yaml"
        path.write_text(yaml.safe_dump(plan.config, sort_keys=False), encoding="utf-8")
        env.update(GENERATION_RAY_NUM_CPUS=str(plan.ray_cpus), GENERATION_SERVE_CONFIG=str(path.resolve()))
    return env


def main(argv: list[str]) -> int:
    try:
        counts = parse_replicas(os.environ.get("REPLICAS", ""))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    procs = processes(counts)
    if argv == ["table"]:
        for s in SERVICES:
            print(s.name, s.module, s.local_port(), s.local_metrics_port(), "http" if s.http else "grpc")
        return 0
    if argv == ["processes"]:
        for proc, svc, _ in procs:
            env = process_env(proc, counts, run_dir=os.devnull) if svc != "generation" else local_wiring(svc)
            s = BY_NAME[svc]
            print(proc, svc, s.module, env[s.port_vars[0]], env["METRICS_PORT"], "http" if s.http else "grpc")
        return 0
    if argv == ["note"]:  # what happens to generation replicas asked beyond one process
        if counts["generation"] > 1:
            print(generation_plan(counts["generation"],
                                  base_cpus=int(os.environ.get("GENERATION_RAY_NUM_CPUS", 2))).note)
        return 0
    if len(argv) == 2 and argv[0] == "env" and argv[1] in {p for p, _, _ in procs}:
        for key, value in process_env(argv[1], counts, run_dir=os.environ.get("STACK_RUN_DIR", "")).items():
            print(f"{key}={value}")
        return 0
    names = ",".join(p for p, _, _ in procs)
    print(f"usage: python -m devtools.services table | processes | note | env {{{names}}}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
