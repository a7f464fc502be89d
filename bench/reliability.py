"""`make reliability`: load, admission control, faults, rolling restarts and hostile input, measured.

Runs the real stack (tests/pipeline/stack.py: real Kafka, gRPC services, Ray Serve, the served
ONNX model) on loopback only, with a fixed number of chats per phase, and writes
bench/results/reliability.json and reliability.md:

0. capacity: with admission wide open, raise concurrent chats (1, 2, 4, 8, 12, 16, 20, 24, 32) until
   one level breaks the SLO (a chat fails, or time to first token above --slo-ttft; with this few
   chats per level, p99 is the maximum). Capacity C is the last level that held, and the gateway
   is restarted with C as its admission limit (CHAT_MAX_CONCURRENT). Levels go past 16 because a
   batching engine's capacity is meant to be 3x the old engine's 8 (issue 15); the capacity a new
   search replaces is kept in the JSON's ``capacity_history`` (with the commit it ran on).
1. load: C concurrent chats (C = the measured capacity) at 1x, 2x and 4x C: completed,
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
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "python")]

import grpc  # noqa: E402
from colloquy.v1 import chat_pb2_grpc  # noqa: E402

from bench import common  # noqa: E402
from tests.pipeline.load import (  # noqa: E402
    QUESTIONS,
    Load,
    Outcome,
    chat_once,
    history_check,
    probe_until_ok,
    replica_pids,
)
from tests.pipeline.stack import Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def pct(values: list[float], q: float) -> float | None:
    return round(common.percentile(values, q * 100), 3) if values else None


# -- 1. load and admission -----------------------------------------------------------------------
def burst(stub: chat_pb2_grpc.ChatServiceStub, n: int, rounds: int) -> list[Outcome]:
    """`rounds` waves of `n` chats started together, each a fresh conversation."""
    outcomes: list[Outcome] = []
    for r in range(rounds):
        with cf.ThreadPoolExecutor(n) as pool:
            outcomes += list(pool.map(lambda i, r=r: chat_once(stub, QUESTIONS[(i + r) % len(QUESTIONS)], key=i),
                                      range(n)))
    return outcomes


def phase_capacity(stub: chat_pb2_grpc.ChatServiceStub, levels: list[int], slo_ttft_s: float,
                   rounds: int) -> dict[str, Any]:
    """Raise concurrency until the SLO breaks. Capacity: the highest level at which every chat
    completed and every time to first token stayed within `slo_ttft_s` (admission wide open)."""
    rows, capacity = [], 0
    for n in levels:
        outcomes = burst(stub, n, rounds)
        ok = [o for o in outcomes if o.done]
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        meets = len(ok) == len(outcomes) and bool(ttft) and max(ttft) <= slo_ttft_s
        rows.append({"concurrent": n, "chats": len(outcomes), "completed": len(ok),
                     "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "meets_slo": meets})
        print(f"capacity search: {n} concurrent: {len(ok)}/{len(outcomes)} completed, ttft p50 "
              f"{rows[-1]['ttft_p50_s']} p99 {rows[-1]['ttft_p99_s']} s -> {'ok' if meets else 'SLO broken'}",
              flush=True)
        if not meets:
            break
        capacity = n
    return {"slo_ttft_p99_s": slo_ttft_s, "levels": rows, "capacity": max(1, capacity),
            "measured_unix": time.time(), "commit": _commit()}


def _commit() -> str | None:
    """The checkout's commit: which engine a capacity figure belongs to."""
    import subprocess

    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or None


def phase_load(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, capacity: int, rounds: int) -> dict[str, Any]:
    rows = []
    for mult in (1, 2, 4):
        n = capacity * mult
        before = {k: round(v, 1) for k, v in stack.rss_mb().items()}
        outcomes = burst(stub, n, rounds)
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
        history = kept.get("capacity_history") or [kept[k] for k in ("capacity_previous",) if k in kept]
        if "capacity" in result and "capacity" in kept:  # the figures new searches replaced, for comparison
            history = [*history, {**kept["capacity"], "run_started_unix": kept.get("started_unix")}]
        if history:
            result["capacity_history"] = history
        result = {**{k: v for k, v in kept.items() if k in PHASES}, **result}
    (RESULTS / "reliability.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (RESULTS / "reliability.md").write_text(text)
    print(text, end="")


def render(result: dict[str, Any]) -> str:
    """reliability.md's table from reliability.json's phases (each from its last run)."""
    lines = ["| what | figure |", "|---|---|"]
    cap = result.get("capacity")
    if cap:
        steps = ", ".join(f"{r['concurrent']}: p99 {r['ttft_p99_s']} s{'' if r['meets_slo'] else ' (broken)'}"
                          for r in cap["levels"])
        lines.append(f"| capacity search (TTFT p99 <= {cap['slo_ttft_p99_s']} s, all complete) | "
                     f"**{cap['capacity']}** concurrent chats; {steps} |")
        for prev in result.get("capacity_history", []):
            commit = prev.get("commit") or "before the batching engine"
            lines.append(f"| capacity found by an earlier search (commit {commit}) | {prev['capacity']} concurrent "
                         f"chats: now {cap['capacity'] / prev['capacity']:.1f}x |")
    load = result.get("load")
    if load:
        earlier = " (load phase of an earlier run, at that run's capacity)" if cap and cap["capacity"] != load[
            "capacity"] else ""
        lines.append(f"| capacity (gateway admission limit){earlier} | {load['capacity']} concurrent chats |")
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
    return "\n".join(lines) + "\n"


PHASES = ("capacity", "load", "faults", "rolling", "fuzz")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=0,
                    help="the gateway's admission limit (CHAT_MAX_CONCURRENT); 0: measure it (phase capacity)")
    ap.add_argument("--levels", default="1,2,4,8,12,16,20,24,32", help="concurrency levels of the capacity search")
    ap.add_argument("--slo-ttft", type=float, default=5.0, help="capacity SLO: time to first token p99, seconds")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per load level")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients during faults and restarts")
    ap.add_argument("--dwell", type=float, default=8.0, help="seconds of load between faults")
    ap.add_argument("--fuzz", type=int, default=40, help="random inputs per RPC")
    ap.add_argument("--phases", default=",".join(PHASES))
    args = ap.parse_args()
    from tests import kafka_broker

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    kafka_broker.ensure_broker(bootstrap)
    levels = [int(x) for x in args.levels.split(",")]
    # Generation's queues stay bounded at the search's highest level; the gateway admits the
    # capacity (first wide open for the search, then the measured or given limit).
    bound = str(max([*levels, args.capacity]))
    env = {"gateway": {"CHAT_MAX_CONCURRENT": str(args.capacity or max(levels)), "CHAT_USER_RATE_PER_MINUTE": "0"},
           "generation": {"GENERATION_MAX_RUNNING": bound, "GENERATION_MAX_WAITING": bound}}
    lock = common.stack_lock()  # the whole stack's run holds the shared cores
    lock.__enter__()
    stack = Stack(bootstrap, extra_env=env).start()
    result: dict[str, Any] = {"started_unix": time.time(), "load_average_start": os.getloadavg(),
                              "args": vars(args), "run_id": uuid.uuid4().hex[:8]}
    try:
        with grpc.insecure_channel(stack.gateway) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            probe_until_ok(stub)
            phases = args.phases.split(",")
            capacity = args.capacity
            if not capacity:
                result["capacity"] = phase_capacity(stub, levels, args.slo_ttft, args.rounds)
                capacity = result["capacity"]["capacity"]
                stack.extra_env["gateway"]["CHAT_MAX_CONCURRENT"] = str(capacity)
                stack.restart("gateway")  # same port: the channel reconnects
                probe_until_ok(stub)
            if "load" in phases:
                result["load"] = phase_load(stack, stub, capacity, args.rounds)
            if "faults" in phases:
                result["faults"] = phase_faults(stack, stub, args.clients, args.dwell)
            if "rolling" in phases:
                result["rolling"] = phase_rolling(stack, stub, args.clients, args.dwell)
            if "fuzz" in phases:
                result["fuzz"] = phase_fuzz(stack, args.fuzz)
    finally:
        result["load_average_end"] = os.getloadavg()
        stack.stop()
        lock.__exit__(None, None, None)
        write_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
