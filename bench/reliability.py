"""`make reliability`: load, admission control, faults, rolling restarts and hostile input, measured.

Runs the real stack (tests/pipeline/stack.py: real Kafka, gRPC services, Ray Serve, the served
ONNX model) on loopback only, with a fixed number of chats per phase, and writes
bench/results/reliability.json and reliability.md:

1. load: C concurrent chats (C = the gateway's admission limit) at 1x, 2x and 4x C: completed,
   refused fast (RESOURCE_EXHAUSTED), other errors, time to first token p50/p99 of the accepted,
   time to refusal, and the services' memory before/after.
2. faults: while chats run, SIGKILL each service in turn (gateway, tokenizer, moderation, prompt,
   the generation replica, feedback sink) and restart the Kafka broker once. Every chat must end
   in an answer or a clear error; afterwards the history (GetConversation) is checked for lost
   turns (the client saw `done`, the history lacks it) and duplicated ones (one request recorded
   twice); recovery = restart until a probe chat completes.
3. rolling restart: SIGTERM each service in turn under load; chats that failed are counted.
4. hostile input: the fuzz strategies of tests/pipeline/test_fuzz.py against every public RPC.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "python")]

import grpc  # noqa: E402
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2  # noqa: E402

from bench import common  # noqa: E402
from tests.pipeline.stack import Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KEYS = [("authorization", f"Bearer {k}") for k in ("colloquy-dev-key", "colloquy-dev-key-alice",
                                                    "colloquy-dev-key-bob")]
SAMPLING = common_pb2.SamplingParams(temperature=0.0, max_tokens=24)
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 plus 2?",
             "Say hello in Spanish.", "What do bees make?", "What is ice made of?"]


@dataclass
class Outcome:
    conversation: str = ""
    request_id: str = ""
    code: str = "OK"
    detail: str = ""
    ttft_s: float | None = None
    total_s: float = 0.0
    done: bool = False


def chat_once(stub: chat_pb2_grpc.ChatServiceStub, message: str, conversation: str = "", key: int = 0,
              timeout: float = 240.0, wait_for_ready: bool = False) -> Outcome:
    out = Outcome(conversation=conversation)
    t0 = time.perf_counter()
    try:
        for ev in stub.Chat(chat_pb2.ChatRequest(conversation_id=conversation, message=message, sampling=SAMPLING),
                            metadata=[KEYS[key % len(KEYS)]], timeout=timeout, wait_for_ready=wait_for_ready):
            kind = ev.WhichOneof("event")
            if kind == "started":
                out.conversation, out.request_id = ev.started.conversation_id, ev.started.request_id
            elif kind == "delta" and out.ttft_s is None:
                out.ttft_s = time.perf_counter() - t0
            elif kind == "done":
                out.done = True
    except grpc.RpcError as exc:
        out.code, out.detail = exc.code().name, exc.details() or ""
    out.total_s = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float | None:
    return round(common.percentile(values, q * 100), 3) if values else None


# -- 1. load and admission -----------------------------------------------------------------------
def phase_load(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, capacity: int, rounds: int) -> dict[str, Any]:
    rows = []
    for mult in (1, 2, 4):
        n = capacity * mult
        before = {k: round(v, 1) for k, v in stack.rss_mb().items()}
        outcomes: list[Outcome] = []
        for r in range(rounds):
            with cf.ThreadPoolExecutor(n) as pool:
                outcomes += list(pool.map(lambda i, r=r: chat_once(stub, QUESTIONS[(i + r) % len(QUESTIONS)], key=i),
                                          range(n)))
        ok = [o for o in outcomes if o.done]
        refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
        rows.append({
            "multiple": mult, "concurrent": n, "chats": len(outcomes), "completed": len(ok),
            "refused_resource_exhausted": len(refused),
            "other_errors": sorted({f"{o.code}: {o.detail}" for o in outcomes if not o.done and o not in refused}),
            "success_rate_of_accepted": round(len(ok) / max(1, len(outcomes) - len(refused)), 3),
            "ttft_p50_s": pct([o.ttft_s for o in ok if o.ttft_s is not None], 0.5),
            "ttft_p99_s": pct([o.ttft_s for o in ok if o.ttft_s is not None], 0.99),
            "refusal_p50_s": pct([o.total_s for o in refused], 0.5),
            "rss_mb_before": before, "rss_mb_after": {k: round(v, 1) for k, v in stack.rss_mb().items()},
        })
        print(f"load {mult}x ({n} concurrent): completed {len(ok)}/{len(outcomes)}, refused {len(refused)}, "
              f"ttft p50 {rows[-1]['ttft_p50_s']} p99 {rows[-1]['ttft_p99_s']} s", flush=True)
    return {"capacity": capacity, "rows": rows}


# -- 2 and 3. faults and rolling restarts under load -----------------------------------------------
@dataclass
class Load:
    """Clients holding multi-turn conversations until stopped; every outcome kept."""

    stub: chat_pb2_grpc.ChatServiceStub
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(k,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _client(self, k: int) -> None:
        conv, turn = "", 0
        while not self.stop.is_set():
            o = chat_once(self.stub, QUESTIONS[(k + turn) % len(QUESTIONS)], conv, key=k, wait_for_ready=True)
            self.outcomes.append(o)
            if o.done:
                conv, turn = o.conversation, turn + 1
                if turn >= 6:
                    conv, turn = "", 0
            else:
                time.sleep(1.0)  # a failed turn: back off, then continue the same conversation
            if o.code == "NOT_FOUND":
                conv = ""

    def finish(self, timeout: float = 300) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


def probe_until_ok(stub: chat_pb2_grpc.ChatServiceStub, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if chat_once(stub, "Hello!", timeout=120, wait_for_ready=True).done:
            return round(time.monotonic() - t0, 1)
        time.sleep(0.5)
    return float("inf")


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:generation"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def history_check(stub: chat_pb2_grpc.ChatServiceStub, outcomes: list[Outcome]) -> dict[str, int]:
    """Lost: a `done` the client saw but the history lacks; duplicated: a request recorded twice."""
    by_conv: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.conversation:
            by_conv.setdefault(o.conversation, []).append(o)
    lost = dup = checked = 0
    for conv, outs in by_conv.items():
        view = None
        for key in range(len(KEYS)):  # the owner's key is the one that finds it
            try:
                view = stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv),
                                            metadata=[KEYS[key]], timeout=30)
                break
            except grpc.RpcError:
                continue
        recorded = [t.request_id for t in view.turns] if view is not None else []
        dup += len(recorded) - len(set(recorded))
        for o in outs:
            if o.done:
                checked += 1
                lost += o.request_id not in recorded
    return {"turns_checked": checked, "lost": lost, "duplicated": dup}


def phase_faults(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, clients: int, dwell: float) -> dict[str, Any]:
    from tests import kafka_broker

    load = Load(stub, clients).start()
    rows = []
    time.sleep(dwell)
    for victim in ["gateway", "tokenizer", "moderation", "prompt", "generation-replica", "feedback", "kafka"]:
        n_before = len(load.outcomes)
        t0 = time.monotonic()
        if victim == "kafka":
            kafka_broker.restart_broker(stack.bootstrap)
        elif victim == "generation-replica":
            for pid in replica_pids():
                os.kill(pid, signal.SIGKILL)  # Serve's controller starts a new replica
        else:
            stack.procs[victim].signal(signal.SIGKILL)
            stack.procs[victim].wait(10)
            stack.restart(victim)
        recovery = probe_until_ok(stub)
        rows.append({"fault": f"SIGKILL {victim}" if victim != "kafka" else "restart the Kafka broker",
                     "recovery_s": round(time.monotonic() - t0, 1), "probe_after_restart_s": recovery})
        time.sleep(dwell)
        window = load.outcomes[n_before:]
        rows[-1]["chats_in_window"] = len(window)
        rows[-1]["failed_with_clear_error"] = sum(1 for o in window if not o.done and o.detail)
        print(f"fault {rows[-1]['fault']}: recovered in {rows[-1]['recovery_s']} s", flush=True)
    load.finish()
    unclear = [o for o in load.outcomes if not o.done and not o.detail]
    return {"rows": rows, "chats": len(load.outcomes), "completed": sum(o.done for o in load.outcomes),
            "ended_without_clear_error": len(unclear), "history": history_check(stub, load.outcomes)}


def phase_rolling(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, clients: int, dwell: float) -> dict[str, Any]:
    load = Load(stub, clients).start()
    time.sleep(dwell)
    restarted = []
    for name in ["tokenizer", "moderation", "prompt", "feedback", "gateway"]:
        t0 = time.monotonic()
        stack.restart(name)  # SIGTERM, drain, start again
        restarted.append({"service": name, "restart_s": round(time.monotonic() - t0, 1)})
        time.sleep(dwell)
    load.finish()
    failed = [o for o in load.outcomes if not o.done]
    print(f"rolling restart: {len(failed)} of {len(load.outcomes)} chats failed", flush=True)
    return {"restarts": restarted, "chats": len(load.outcomes), "failed": len(failed),
            "failures": sorted({f"{o.code}: {o.detail}" for o in failed}),
            "history": history_check(stub, load.outcomes)}


# -- 4. hostile input ----------------------------------------------------------------------------
def phase_fuzz(stack: Stack, per_rpc: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.pipeline import test_fuzz as fz

    counts: dict[str, dict[str, int]] = {}

    def fuzz_one(service: str, method: str, req: type, streaming: bool) -> dict[str, int]:
        seen: dict[str, int] = {}

        @settings(max_examples=per_rpc, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(payload=st.one_of(fz.messages(req.DESCRIPTOR), st.binary(max_size=512)))
        def run(payload: bytes) -> None:
            try:
                code = fz._call(stack, service, method, streaming, payload).name
            except AssertionError as exc:
                code = f"FORBIDDEN {exc}"
            seen[code] = seen.get(code, 0) + 1

        run()
        return seen

    for service, method, req, _resp, streaming in fz.RPCS:
        counts[method] = fuzz_one(service, method, req, streaming)
    tried = sum(sum(v.values()) for v in counts.values())
    forbidden = sum(n for v in counts.values() for k, n in v.items() if k.startswith("FORBIDDEN"))
    print(f"hostile input: {tried} tried, {forbidden} INTERNAL/UNKNOWN", flush=True)
    return {"tried": tried, "internal_or_unknown": forbidden, "by_method": counts,
            "alive": all(p.popen.poll() is None for p in stack.procs.values())}


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "reliability.json"
    if previous.is_file():  # a run of some phases keeps the other phases' last figures
        kept = json.loads(previous.read_text())
        result = {**{k: v for k, v in kept.items() if k in ("load", "faults", "rolling", "fuzz")}, **result}
    (RESULTS / "reliability.json").write_text(json.dumps(result, indent=2))
    lines = ["| what | figure |", "|---|---|"]
    load = result.get("load")
    if load:
        lines.append(f"| capacity (gateway admission limit) | {load['capacity']} concurrent chats |")
        for r in load["rows"]:
            lines.append(f"| load {r['multiple']}x ({r['concurrent']} concurrent) | {r['completed']}/{r['chats']} "
                         f"completed, {r['refused_resource_exhausted']} refused fast; TTFT p50 {r['ttft_p50_s']} s, "
                         f"p99 {r['ttft_p99_s']} s; refusal p50 {r['refusal_p50_s']} s |")
    faults = result.get("faults")
    if faults:
        for r in faults["rows"]:
            lines.append(f"| {r['fault']} under load | recovered in {r['recovery_s']} s |")
        h = faults["history"]
        lines.append(f"| faults: chats | {faults['completed']}/{faults['chats']} completed, "
                     f"{faults['ended_without_clear_error']} ended without a clear error |")
        lines.append(f"| faults: history | {h['turns_checked']} turns checked, {h['lost']} lost, "
                     f"{h['duplicated']} duplicated |")
    rolling = result.get("rolling")
    if rolling:
        lines.append(f"| rolling restart (SIGTERM each service) | {rolling['failed']} of {rolling['chats']} "
                     f"chats failed; {rolling['history']['lost']} lost, {rolling['history']['duplicated']} "
                     f"duplicated turns |")
    fuzz = result.get("fuzz")
    if fuzz:
        lines.append(f"| hostile input | {fuzz['tried']} random messages/bytes to {len(fuzz['by_method'])} RPCs, "
                     f"{fuzz['internal_or_unknown']} INTERNAL/UNKNOWN, services alive: {fuzz['alive']} |")
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=8, help="the gateway's admission limit (CHAT_MAX_CONCURRENT)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per load level")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients during faults and restarts")
    ap.add_argument("--dwell", type=float, default=8.0, help="seconds of load between faults")
    ap.add_argument("--fuzz", type=int, default=40, help="random inputs per RPC")
    ap.add_argument("--phases", default="load,faults,rolling,fuzz")
    args = ap.parse_args()
    from tests import kafka_broker

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    kafka_broker.ensure_broker(bootstrap)
    env = {"gateway": {"CHAT_MAX_CONCURRENT": str(args.capacity), "CHAT_USER_RATE_PER_MINUTE": "0"},
           "generation": {"GENERATION_MAX_RUNNING": str(args.capacity), "GENERATION_MAX_WAITING": str(args.capacity)}}
    stack = Stack(bootstrap, extra_env=env).start()
    result: dict[str, Any] = {"started_unix": time.time(), "load_average_start": os.getloadavg(),
                              "args": vars(args), "run_id": uuid.uuid4().hex[:8]}
    try:
        with grpc.insecure_channel(stack.gateway) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            probe_until_ok(stub)
            phases = args.phases.split(",")
            if "load" in phases:
                result["load"] = phase_load(stack, stub, args.capacity, args.rounds)
            if "faults" in phases:
                result["faults"] = phase_faults(stack, stub, args.clients, args.dwell)
            if "rolling" in phases:
                result["rolling"] = phase_rolling(stack, stub, args.clients, args.dwell)
            if "fuzz" in phases:
                result["fuzz"] = phase_fuzz(stack, args.fuzz)
    finally:
        result["load_average_end"] = os.getloadavg()
        stack.stop()
        write_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
