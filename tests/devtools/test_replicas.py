"""Replicas in the local stack (issue 22 item 1): REPLICAS, each replica's ports, id and peers, and
generation's Serve replicas capped by the cores; no service is started (tests/pipeline/
test_replicas.py runs two gateways)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devtools import services
from devtools.stack import Stack

ROOT = Path(__file__).resolve().parents[2]


def test_replicas_spec_every_service_or_per_service() -> None:
    assert set(services.parse_replicas("").values()) == {1}
    assert set(services.parse_replicas("2").values()) == {2}
    counts = services.parse_replicas("gateway=2, prompt=3")
    assert (counts["gateway"], counts["prompt"], counts["tokenizer"]) == (2, 3, 1)
    counts = services.parse_replicas("2 web=1")
    assert (counts["web"], counts["moderation"]) == (1, 2)


@pytest.mark.parametrize(("spec", "message"), [
    ("gatway=2", "unknown service 'gatway'"), ("gateway=0", "1..8"), ("gateway=9", "1..8"), ("two", "'two'"),
])
def test_a_bad_replicas_spec_is_refused_with_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        services.parse_replicas(spec)


def test_each_replica_has_its_own_ports_and_id_and_dials_a_peer_replica() -> None:
    counts = services.parse_replicas("gateway=2 moderation=2 web=3")
    procs = services.processes(counts)
    assert [p for p, svc, _ in procs if svc in ("gateway", "web", "generation")] == [
        "generation", "gateway", "gateway-2", "web", "web-2", "web-3"]
    env = {"INSTANCE_ID": "local"}
    g1, g2 = (services.process_env(p, counts, env) for p in ("gateway", "gateway-2"))
    assert (g1["GRPC_PORT"], g1["METRICS_PORT"], g1["INSTANCE_ID"]) == ("50051", "9101", "local")
    assert (g2["GRPC_PORT"], g2["METRICS_PORT"], g2["INSTANCE_ID"]) == ("50151", "9201", "local-2")
    assert (g1["MODERATION_ADDR"], g2["MODERATION_ADDR"]) == ("127.0.0.1:50053", "127.0.0.1:50153")
    w3 = services.process_env("web-3", counts, env)
    assert (w3["WEB_PORT"], w3["GATEWAY_ADDR"]) == ("8280", "127.0.0.1:50051")  # dealt round: 3 -> 1
    assert "INSTANCE_ID" not in services.process_env("gateway-2", counts, {})  # derives <host>-50151


def test_generation_stays_one_process_and_its_serve_replicas_fit_the_cores(tmp_path: Path) -> None:
    assert [p for p, svc, _ in services.processes(services.parse_replicas("3")) if svc == "generation"] == [
        "generation"]
    small = services.generation_plan(2, cores=2)
    assert (small.ray_cpus, small.fits) == (2, 1)  # a replica takes 2 CPUs: one fits, not two
    assert "1 replica runs" in small.note and "serving.cap_replicas" in small.note
    big = services.generation_plan(2, cores=16)
    assert (big.ray_cpus, big.fits) == (4, 2) and "2 replicas run" in big.note
    auto = big.config["applications"][0]["deployments"][0]["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (2, 2, 2)
    env = services.process_env("generation", services.parse_replicas("generation=2"), {}, run_dir=tmp_path)
    written = yaml.safe_load(Path(env["GENERATION_SERVE_CONFIG"]).read_text())
    assert written["applications"][0]["deployments"][0]["autoscaling_config"]["initial_replicas"] == 2


def test_the_test_stack_wires_replicas_the_same_way() -> None:
    stack = Stack("127.0.0.1:9", replicas={"gateway": 2})
    try:
        names = [p for p, _, _ in services.processes(stack.replicas)]
        stack._pick_ports(names)
        g2 = stack.env("gateway-2")
        assert g2["GRPC_PORT"] == str(stack.ports["gateway-2"]) != str(stack.ports["gateway"])
        assert g2["METRICS_PORT"] == str(stack.metrics_ports["gateway-2"])
        assert g2["INSTANCE_ID"] == f"{stack.instance}-2" and stack.env("gateway")["INSTANCE_ID"] == stack.instance
        assert g2["MODERATION_ADDR"] == f"127.0.0.1:{stack.ports['moderation']}"
        assert g2["CONVERSATION_DB"] == stack.env("gateway")["CONVERSATION_DB"]  # one store
    finally:
        stack.stop()


def test_stack_sh_lists_and_stops_every_replica(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # Not our child (a child would stay a zombie that `kill -0` still finds until we reap it).
    pid = int(subprocess.run(["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], check=True,
                             capture_output=True, text=True).stdout)
    try:
        (run / "gateway-3.pid").write_text(str(pid))  # started earlier with REPLICAS=gateway=3
        env = {"PATH": "/usr/bin:/bin", "COLLOQUY_VAR": str(tmp_path), "REPLICAS": "gateway=2"}
        out = subprocess.run(["bash", "scripts/stack.sh", "status"], cwd=ROOT, check=True, capture_output=True,
                             text=True, env=env).stdout
        lines = [line.split(":")[0] for line in out.splitlines()]
        assert lines[lines.index("gateway"):lines.index("web")] == ["gateway", "gateway-2", "gateway-3"]
        assert "gateway-3: running" in out
        out = subprocess.run(["bash", "scripts/stack.sh", "down", "gateway"], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**env, "REPLICAS": ""}).stdout
        assert "stopped gateway-3" in out and not (run / "gateway-3.pid").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        bad = subprocess.run(["bash", "scripts/stack.sh", "status"], cwd=ROOT, capture_output=True, text=True,
                             env={**env, "REPLICAS": "gatway=2"})
        assert bad.returncode == 1 and "unknown service 'gatway'" in bad.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_cli_processes_and_note() -> None:
    def cli(*args: str, replicas: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "devtools.services", *args], cwd=ROOT, capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "REPLICAS": replicas})

    rows = [line.split() for line in cli("processes", replicas="prompt=2").stdout.splitlines()]
    assert ["prompt-2", "prompt", "services.prompt", "50154", "9204", "grpc"] in rows
    assert cli("note", replicas="2").stdout.startswith("generation: 2 Ray Serve replicas asked")
    assert cli("note", replicas="gateway=2").stdout == ""


def test_a_taken_metrics_port_moves_that_service_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A metrics port picked free but taken before the service binds it: that service restarts
    once on a new metrics port (its gRPC port, which peers were told, stays); other errors raise."""
    stack = Stack("127.0.0.1:9")
    stack.ports["prompt"], stack.metrics_ports["prompt"] = 4001, 4002
    spawned: list[tuple[int, int]] = []
    failures = ["Traceback ... serve_metrics ... OSError: [Errno 98] Address already in use"]

    def wait_serving(name: str, timeout: float = 240.0) -> None:
        if failures:
            raise RuntimeError(f"process exited with 1:\n{failures.pop()}")

    monkeypatch.setattr(stack, "wait_serving", wait_serving)
    monkeypatch.setattr(stack, "spawn", lambda name: spawned.append((stack.ports[name],
                                                                     stack.metrics_ports.setdefault(name, 5002))))
    stack._wait_serving_or_move_metrics("prompt")
    assert spawned == [(4001, 5002)]
    failures.append("grpc: Address already in use")  # not the metrics server: no second guess
    with pytest.raises(RuntimeError):
        stack._wait_serving_or_move_metrics("prompt")
