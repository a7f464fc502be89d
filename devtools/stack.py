"""The whole Colloquy stack as separate OS processes on free ports, for end-to-end tests and benchmarks.

Which services, their modules, start order and wiring come from devtools/services.py (the table
scripts/stack.sh reads too); this adds free ports and the settings a test run needs.

Replicas: `Stack(..., replicas={"gateway": 2})` starts two gateway processes, `stack.add_replica(
"gateway")` one more in a running stack. Replica k of a service is the process `<name>-<k>` (the
first keeps the plain name: `procs`, `ports` and `restart` take process names), with its own
ports, INSTANCE_ID (`<stack id>-<k>`) and log; it dials the peer replicas dealt to it
(services.peer_process). Generation stays one process; replicas={"generation": n} asks Ray
Serve for n replicas, which serving.cap_replicas lowers to what the CPUs hold (1 on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid

import yaml

from devtools.procs import Proc, free_port
from devtools.services import (
    BY_NAME,
    MODULES,
    ORDER,
    generation_plan,
    parse_replicas,
    peer_process,
    processes,
    replica_index,
    replica_name,
    service_of,
)
from services.common import health_probe, topics

# The services that open the conversation store: they get the stack's database settings.
STORE_USERS = ("conversation", "prompt", "gateway")


class Stack:
    def __init__(self, bootstrap: str, extra_env: dict[str, dict[str, str]] | None = None,
                 database_url: str = "", replicas: dict[str, int] | str | None = None) -> None:
        """`database_url`: PostgreSQL for the conversation store (an empty database); empty: a
        SQLite file of this stack's own, which the materializer and its readers share (WAL).
        `extra_env`: per service (every replica) or per process (`gateway-2`). `replicas`: per
        service, or a REPLICAS string ("2", "gateway=2 prompt=2"); 1 each by default."""
        self.bootstrap = bootstrap
        self.replicas = parse_replicas(replicas if isinstance(replicas, str) else
                                       " ".join(f"{k}={v}" for k, v in (replicas or {}).items()))
        self.instance = f"t{uuid.uuid4().hex[:8]}"  # stable across restarts: static membership
        # Ports are picked just before their services start (generation's first, the others once
        # Ray is up): Ray's many workers take ephemeral ports too, so picking every port up front
        # left time for one of them to take a port meant for a service ("Address already in use").
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.extra_env = extra_env or {}
        self.procs: dict[str, Proc] = {}
        self._store_dir = "" if database_url else tempfile.mkdtemp(prefix="colloquy-stack-store-")
        self._conf_dir = tempfile.mkdtemp(prefix="colloquy-stack-conf-")
        self.store_env = {"CONVERSATION_GROUP_ID": f"colloquy-conversation-{self.instance}",
                          **({"DATABASE_URL": database_url} if database_url else
                             {"CONVERSATION_DB": os.path.join(self._store_dir, "conversations.db")})}

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    @property
    def web(self) -> str:
        """Base URL of the OpenAI-compatible HTTP front."""
        return f"http://127.0.0.1:{self.ports['web']}"

    def replicas_of(self, service: str) -> list[str]:
        """The process names of `service`'s replicas in this stack, in replica order."""
        return sorted((p for p in self.procs if service_of(p) == service), key=replica_index)

    def env(self, process: str) -> dict[str, str]:
        name = service_of(process)
        index = replica_index(process)

        def port_of(svc: str) -> int:
            return self.ports[process if svc == name else peer_process(svc, index, self.replicas)]

        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "INSTANCE_ID": replica_name(self.instance, index),
            **BY_NAME[name].wiring(port_of, self.metrics_ports[process]),
            "SHUTDOWN_GRACE_SECONDS": "10",
            # Hanging-transaction sweeps often enough to heal within a test's recovery wait.
            "KAFKA_HANGING_TXN_CHECK_S": "5", "KAFKA_HANGING_TXN_AGE_S": "45",
        }
        if name in STORE_USERS:
            env.update(self.store_env)
        if name == "gateway":
            # A loaded 2-core CI box is slow, not stuck.
            env.update(CHAT_REPLY_IDLE_TIMEOUT_SECONDS="120", CHAT_CHECK_TIMEOUT_SECONDS="120",
                       CHAT_USER_RATE_PER_MINUTE="600", CHAT_USER_BURST="30",
                       # Suites and benchmarks (bench/ uses this harness) run up to 32 chats at
                       # once on one or three keys; tests/gateway/test_public_limits.py checks the cap.
                       CHAT_MAX_CONCURRENT_PER_USER="0")
        if name == "generation":
            env.update(GENERATION_REPLICA_METRICS_PORT="0", GENERATION_RAY_NUM_CPUS="2")
            if self.replicas["generation"] > 1:
                plan = generation_plan(self.replicas["generation"])
                path = os.path.join(self._conf_dir, "generation-serve.yaml")
                with open(path, "w", encoding="utf-8") as fh:
                    yaml.safe_dump(plan.config, fh, sort_keys=False)
                env.update(GENERATION_RAY_NUM_CPUS=str(plan.ray_cpus), GENERATION_SERVE_CONFIG=path)
        env.update(self.extra_env.get(name, {}))
        if process != name:
            env.update(self.extra_env.get(process, {}))
        return env

    def _pick_ports(self, names: list[str]) -> None:
        for name in names:
            self.ports.setdefault(name, free_port())
            self.metrics_ports.setdefault(name, free_port())

    def spawn(self, name: str) -> Proc:
        """Start process `name` (a service or one of its replicas, `gateway-2`) on its ports."""
        self._pick_ports([name])
        proc = Proc(MODULES[service_of(name)], self.env(name))
        self.procs[name] = proc
        return proc

    def add_replica(self, service: str) -> str:
        """Start one more replica of `service` in the running stack and wait until it serves;
        returns its process name. Generation's replicas are Ray Serve's (not a process)."""
        if service == "generation":
            raise ValueError("generation replicas are Ray Serve's: pass replicas={'generation': n} to Stack")
        name = replica_name(service, len(self.replicas_of(service)) + 1)
        self.replicas[service] = replica_index(name)
        self.spawn(name)
        self.wait_serving(name)
        return name

    def remove_replica(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop replica process `name` with `sig` (SIGTERM drains, SIGKILL does not), wait for
        it and forget it (procs, ports; its log file stays); returns its exit code."""
        proc = self.procs.pop(name)
        self.ports.pop(name, None)
        self.metrics_ports.pop(name, None)
        service = service_of(name)
        self.replicas[service] = max((replica_index(p) for p in self.replicas_of(service)), default=1)
        proc.signal(sig)
        return proc.wait(timeout)

    def wait_serving(self, name: str, timeout: float = 240.0) -> None:
        """Until its log says "serving" and, for a service whose health waits for something (the
        conversation store for the materializer, prompt and gateway), its health is SERVING."""
        proc = self.procs[name]
        proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=timeout)
        if service_of(name) not in STORE_USERS:
            return
        deadline = time.monotonic() + timeout
        while not health_probe.serving(f"127.0.0.1:{self.ports[name]}"):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} never became SERVING:{proc.diagnosis()}")
            time.sleep(0.2)

    def start(self) -> Stack:
        topics.ensure_topics(self.bootstrap)
        try:
            # Ray first and alone: on 2 cores its raylet gives up waiting for its metrics agent
            # when five other Python services import their dependencies at the same time.
            self._start_generation()
            names = [p for p, svc, _ in processes(self.replicas) if svc != "generation"]
            self._pick_ports(names)  # all at once: the gateway's env names moderation's port
            for name in names:
                self.spawn(name)
            for name in names:
                self._wait_serving_or_move_metrics(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving_or_move_metrics(self, name: str) -> None:
        """A service of `start`: a metrics port picked free can be taken before the service binds
        it (seen in CI: prompt's, and every pipeline test after it failed with the stack). Its
        gRPC port stays: the peers were told it; no other process is told a metrics port."""
        self._serve_moving_taken_ports(name, grpc_too=False)

    def _start_generation(self) -> None:
        """Generation: its ports are picked before Ray starts, and Ray's own processes bind ports
        in between (seen once in CI: the worker's metrics port); nothing else is told them yet."""
        self.spawn("generation")
        self._serve_moving_taken_ports("generation", grpc_too=True, timeout=400)

    def _serve_moving_taken_ports(self, name: str, *, grpc_too: bool, timeout: float = 240.0) -> None:
        """`wait_serving`, with one restart on new ports when the process found one taken
        ("Address already in use"): the metrics port (only when its server failed, unless
        `grpc_too`) and, with `grpc_too`, the gRPC port."""
        for attempt in range(2):
            try:
                self.wait_serving(name, timeout=timeout)
                return
            except RuntimeError as exc:
                text = str(exc)
                if attempt or "Address already in use" not in text or not (grpc_too or "serve_metrics" in text):
                    raise
                self.metrics_ports.pop(name)
                if grpc_too:
                    self.ports.pop(name)
                self.spawn(name)

    def restart(self, name: str) -> None:
        old = self.procs.get(name)
        if old is not None and old.popen.poll() is None:
            old.signal(signal.SIGTERM)
            old.wait(60)
        self.spawn(name)
        self.wait_serving(name)

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each service process, in MiB (0 for one that is gone)."""
        out = {}
        for name, proc in self.procs.items():
            try:
                with open(f"/proc/{proc.popen.pid}/status") as fh:
                    out[name] = int(next(x for x in fh if x.startswith("VmRSS")).split()[1]) / 1024
            except (OSError, StopIteration):
                out[name] = 0.0
        return out

    def stop(self) -> None:
        for name in reversed(ORDER):
            for replica in self.replicas_of(name):
                proc = self.procs[replica]
                if proc.popen.poll() is None:
                    proc.signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except Exception:
                proc.kill()
        if self._store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)
        shutil.rmtree(self._conf_dir, ignore_errors=True)
