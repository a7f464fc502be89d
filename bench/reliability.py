"""`make reliability`: load, admission control, faults, rolling restarts and hostile input, measured.

Runs the real stack (devtools/stack.py: real Kafka, gRPC services, Ray Serve, the served
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
4. hostile input: the fuzz strategies of devtools/fuzz.py against every public RPC.
5. idempotent retries (phase ``idempotent``): under load, chats keyed with ``client_request_id``
   are retried after the answer finished (replay), while the first stream still runs (join) and
   after the gateway was SIGKILLed mid-stream (the pipeline finishes the turn without it); each
   retry must name the same turn and the history must hold it once.
6. per-user cap (phase ``usercap``): the gateway restarted with CHAT_MAX_CONCURRENT_PER_USER (the
   shared harness runs with it off); one key floods it from more threads than its cap while
   another key keeps chatting: the flood's excess is refused RESOURCE_EXHAUSTED, the other user's
   chats are admitted and answered.
7. hostile backlog (phase ``backlog``): N expensive-but-valid chats at once (8 KiB of distinct
   random-word sentences, moderation's worst case, longer than the model's slot so the prompt
   stage refuses them; and 6 KiB of distinct plain sentences that fit and are answered), with
   normal chats sent while it drains. Consumer-group lag of every stage (records a read_committed
   reader would still get past the group's committed offset) is sampled until it is back to 0:
   time to drain, the peak per stage, records processed twice (a batch redone), outputs written
   twice, and the answered turns' history (lost, duplicated).

``--phases`` runs some of them (``--phases idempotent,usercap,backlog``); a run of some phases
keeps the other phases' last figures in the JSON and the report. Without ``capacity`` among them
the gateway's admission limit is ``--capacity`` or the last measured capacity.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import string
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "python")]

import grpc  # noqa: E402
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2  # noqa: E402

from bench import common  # noqa: E402
from devtools.load import (  # noqa: E402
    KEYS,
    QUESTIONS,
    Load,
    Outcome,
    chat_once,
    history_check,
    probe_until_ok,
    replica_pids,
    settled_history,
)
from devtools.stack import Stack  # noqa: E402

RESULTS = common.RESULTS  # BENCH_RESULTS points a trial run elsewhere


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
    from devtools import kafka_broker

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

    from devtools import fuzz as fz

    counts: dict[str, dict[str, int]] = {}

    def fuzz_one(service: str, method: str, req: type, streaming: bool) -> dict[str, int]:
        seen: dict[str, int] = {}

        @settings(max_examples=per_rpc, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(payload=st.one_of(fz.messages(req.DESCRIPTOR), st.binary(max_size=512)))
        def run(payload: bytes) -> None:
            try:
                code = fz.call(stack, service, method, streaming, payload).name
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


# -- shared by the new phases --------------------------------------------------------------------
def restart_gateway(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, **env: str) -> None:
    """Restart the gateway with some settings changed (same port: the channel reconnects), and
    wait until it answers a chat: each phase sets the limits it measures and restores them."""
    stack.extra_env.setdefault("gateway", {}).update(env)
    stack.restart("gateway")
    probe_until_ok(stub)


def metric_sum(text: str, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` (e.g. ``colloquy_events_consumed_total``) whose labels
    include `labels`, in a Prometheus text page: the stages' counters are read, not guessed."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(stack: Stack, service: str) -> str:
    """A service's /metrics page ('' when it cannot be read: a figure goes missing, not the run)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics", timeout=10) as r:
            return r.read().decode()
    except OSError:
        return ""


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end at the same instant as a start closes first)."""
    spans = list(intervals)  # a generator would be spent by the starts
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def drain_time(samples: list[tuple[float, dict[str, int]]]) -> float | None:
    """The time of the first lag sample from which every later sample is 0 on every stage (the
    backlog is gone for good, not between two bursts); None when the last sample still lags."""
    drained: float | None = None
    for t, lags in samples:
        clear = sum(lags.values()) == 0
        drained = (t if drained is None else drained) if clear else None
    return drained


def peak_lag(samples: list[tuple[float, dict[str, int]]]) -> dict[str, int]:
    """The highest lag each stage reached across the samples."""
    peak: dict[str, int] = {}
    for _, lags in samples:
        for stage, n in lags.items():
            peak[stage] = max(peak.get(stage, 0), n)
    return peak


def repeats(ids: Iterable[str]) -> int:
    """How many ids are extra copies: a request id on a stage's output topic more than once."""
    seen: dict[str, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    return sum(n - 1 for n in seen.values())


def random_word_sentences(size: int, seed: int) -> str:
    """`size` bytes of short random words, each its own sentence: no two moderation windows
    repeat (moderation's worst case, tests/moderation/test_windows.py's HOSTILE_DISTINCT)."""
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < size:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))) + ".")
        length += len(words[-1]) + 1
    return " ".join(words)[:size]


PLAIN_WORDS = ["the", "river", "light", "house", "keeper", "walked", "slowly", "along", "a", "quiet", "stone",
               "path", "toward", "old", "harbour", "where", "boats", "rested", "under", "grey", "morning", "sky",
               "while", "gulls", "called", "and", "wind", "carried", "salt"]


def plain_sentences(size: int, seed: int) -> str:
    """`size` bytes of distinct plain sentences ("Note 12: the quiet harbour ..."): many windows
    for moderation, but few enough tokens (about 1,700 for 6 KiB) to fit generation's slot."""
    rng = random.Random(seed)
    out: list[str] = []
    length, i = 0, 0
    while length < size:
        out.append(f"Note {i}: " + " ".join(rng.choice(PLAIN_WORDS) for _ in range(6)) + ".")
        length += len(out[-1]) + 1
        i += 1
    return " ".join(out)[:size]


@dataclass
class Timed:
    """A chat as one client saw it: when its stream began and ended (wall clock of this process),
    whether the gateway admitted it (`started`), and how it ended."""

    key: int
    started_at: float = 0.0
    ended_at: float = 0.0
    admitted: bool = False
    done: bool = False
    code: str = "OK"
    detail: str = ""
    ttft_s: float | None = None
    conversation: str = ""
    turn_index: int = 0
    request_id: str = ""
    text: str = ""
    moderated: str = ""  # the stage of a moderation notice: "input" (refused), "output" (cut)


def timed_chat(stub: chat_pb2_grpc.ChatServiceStub, message: str, key: int, max_tokens: int = 24,
               client_request_id: str = "", conversation: str = "",
               on_event: Callable[[chat_pb2.ChatEvent], bool] | None = None, timeout: float = 240.0) -> Timed:
    """One chat, timed; `on_event` returning True stops reading (the stream is then cancelled)."""
    out = Timed(key=key, started_at=time.monotonic())
    req = chat_pb2.ChatRequest(conversation_id=conversation, message=message, client_request_id=client_request_id,
                               sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    call = stub.Chat(req, metadata=[KEYS[key % len(KEYS)]], timeout=timeout, wait_for_ready=True)
    try:
        for ev in call:
            kind = ev.WhichOneof("event")
            if kind == "started":
                out.admitted = True
                s = ev.started
                out.conversation, out.turn_index, out.request_id = s.conversation_id, s.turn_index, s.request_id
            elif kind == "delta":
                if out.ttft_s is None:
                    out.ttft_s = time.monotonic() - out.started_at
                if ev.delta.index == 0:
                    out.text += ev.delta.text
            elif kind == "moderation":
                out.moderated = ev.moderation.stage
            elif kind == "done":
                out.done = True
                out.ended_at = time.monotonic()  # the slot is freed about now, not at the trailers
            if on_event is not None and on_event(ev):
                call.cancel()
                break
    except grpc.RpcError as exc:
        out.code, out.detail = exc.code().name, exc.details() or ""
    out.ended_at = out.ended_at or time.monotonic()
    return out


def turns_of(stub: chat_pb2_grpc.ChatServiceStub, conversation: str, key: int) -> list[chat_pb2.Turn]:
    """The recorded turns of a conversation (empty when it cannot be read)."""
    try:
        return list(stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conversation),
                                         metadata=[KEYS[key % len(KEYS)]], timeout=30, wait_for_ready=True).turns)
    except grpc.RpcError:
        return []


# -- 5. idempotent retries -----------------------------------------------------------------------
def phase_idempotent(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, clients: int, rounds: int) -> dict[str, Any]:
    """Keyed retries under load: replayed, joined and after a gateway SIGKILL, each checked
    against the history (the same request id, recorded once, nothing else added)."""
    key = 1  # alice; the background load's clients use every key
    load = Load(stub, clients).start()
    cases: dict[str, list[dict[str, Any]]] = {"replay": [], "join": [], "sigkill": []}

    def judge(first: Timed, retry: Timed, retry_s: float, **extra: Any) -> dict[str, Any]:
        turns = turns_of(stub, first.conversation, key)
        same = (retry.conversation, retry.turn_index, retry.request_id) == (
            first.conversation, first.turn_index, first.request_id) and retry.done
        return {"same_turn": same, "same_text": retry.text.startswith(first.text) and bool(retry.text),
                "recorded": sum(t.request_id == first.request_id for t in turns), "turns_in_conversation": len(turns),
                "retry_s": round(retry_s, 3), "retry_code": retry.code, **extra}

    def kill_on_first_delta(ev: chat_pb2.ChatEvent) -> bool:
        """SIGKILL the gateway while this stream is still open (a cancel first would end the turn)."""
        if ev.WhichOneof("event") != "delta":
            return False
        stack.procs["gateway"].signal(signal.SIGKILL)
        return True

    try:
        for r in range(rounds):
            # After the answer finished: the recorded turn is replayed.
            ck = uuid.uuid4().hex
            message = QUESTIONS[r % len(QUESTIONS)]
            first = timed_chat(stub, message, key, client_request_id=ck)
            again = timed_chat(stub, message, key, client_request_id=ck)
            cases["replay"].append(judge(first, again, again.ended_at - again.started_at, first_code=first.code))
            # While the first stream runs: the retry joins it.
            ck = uuid.uuid4().hex
            message = "Tell me a short story about a cat."
            seen = threading.Event()
            box: list[Timed] = []

            def first_stream(ck: str = ck, message: str = message, box: list[Timed] = box,
                             seen: threading.Event = seen) -> None:
                def first_delta(ev: chat_pb2.ChatEvent) -> bool:
                    if ev.WhichOneof("event") == "delta":
                        seen.set()  # the retry goes now, while this stream runs
                    return False

                box.append(timed_chat(stub, message, key, 96, ck, on_event=first_delta))
                seen.set()

            t = threading.Thread(target=first_stream, daemon=True)
            t.start()
            seen.wait(240)
            joined = timed_chat(stub, message, key, 96, ck)
            t.join(240)
            if box:
                cases["join"].append(judge(box[0], joined, joined.ended_at - joined.started_at,
                                           first_code=box[0].code))
            # After a gateway SIGKILL mid-stream: the same turn, finished by the pipeline.
            ck = uuid.uuid4().hex
            message = "Write a long story about a dragon who learns to bake bread."
            killed = timed_chat(stub, message, key, 160, ck, on_event=kill_on_first_delta)
            t0 = time.monotonic()
            stack.procs["gateway"].wait(10)
            stack.restart("gateway")  # same port and instance id
            restart_s = time.monotonic() - t0
            retry = timed_chat(stub, message, key, 160, ck)
            cases["sigkill"].append(judge(killed, retry, retry.ended_at - retry.started_at,
                                          gateway_restart_s=round(restart_s, 1), killed_after_started=killed.admitted))
            print(f"idempotent round {r + 1}: " + ", ".join(
                f"{k} same turn {v[-1]['same_turn'] if v else None}" for k, v in cases.items()), flush=True)
    finally:
        load.finish()
    summary: dict[str, Any] = {}
    for name, rows in cases.items():
        summary[name] = {
            "tries": len(rows), "same_turn": sum(r["same_turn"] for r in rows),
            "recorded_once": sum(r["recorded"] == 1 for r in rows),
            "extra_turns": sum(max(0, r["turns_in_conversation"] - 1) for r in rows),
            "retry_p50_s": pct([r["retry_s"] for r in rows], 0.5),
            "retry_max_s": pct([r["retry_s"] for r in rows], 1.0),
        }
    return {"rounds": rounds, "cases": summary, "tries": cases, "load_chats": len(load.outcomes),
            "load_history": settled_history(stub, load.outcomes)}


# -- 6. per-user cap -----------------------------------------------------------------------------
def phase_usercap(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, cap: int, flood: int, seconds: float,
                  admission: int) -> dict[str, Any]:
    """One key (alice) floods from `flood` threads while the dev key chats within its cap and
    another key (bob) chats one at a time: who is admitted, who refused, how fast bob is served."""
    limit = max(admission, 3 * cap + 2)  # the fleet-wide limit must not be what refuses bob
    restart_gateway(stack, stub, CHAT_MAX_CONCURRENT_PER_USER=str(cap), CHAT_MAX_CONCURRENT=str(limit))
    stop = threading.Event()
    outcomes: dict[str, list[Timed]] = {"flooding key": [], "dev key (within its cap)": [], "another user": []}

    def loop(who: str, key: int, max_tokens: int, pause: float) -> None:
        i = 0
        while not stop.is_set():
            o = timed_chat(stub, QUESTIONS[i % len(QUESTIONS)], key, max_tokens, timeout=180)
            outcomes[who].append(o)
            i += 1
            time.sleep(pause if o.admitted else 0.1)  # a refused flood thread comes straight back

    threads = [threading.Thread(target=loop, args=("flooding key", 1, 64, 0.0), daemon=True) for _ in range(flood)]
    threads += [threading.Thread(target=loop, args=("dev key (within its cap)", 0, 24, 0.2), daemon=True)
                for _ in range(cap)]
    threads += [threading.Thread(target=loop, args=("another user", 2, 24, 0.5), daemon=True)]
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(240)
    finally:
        restart_gateway(stack, stub, CHAT_MAX_CONCURRENT_PER_USER="0", CHAT_MAX_CONCURRENT=str(admission))
    rows = []
    for who, outs in outcomes.items():
        per_key = [o for o in outs if o.code == "RESOURCE_EXHAUSTED" and "this API key" in o.detail]
        other = [o for o in outs if not o.done and not any(o is p for p in per_key)]
        ttft = [o.ttft_s for o in outs if o.done and o.ttft_s is not None]
        rows.append({"who": who, "chats": len(outs), "admitted": sum(o.admitted for o in outs),
                     "completed": sum(o.done for o in outs), "refused_per_key_cap": len(per_key),
                     "refused_other": sorted({f"{o.code}: {o.detail}" for o in other}),
                     "most_held_at_once": max_overlap((o.started_at, o.ended_at) for o in outs if o.admitted),
                     "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
                     "refusal_p50_s": pct([o.ended_at - o.started_at for o in per_key], 0.5)})
        print(f"usercap {who}: {rows[-1]['completed']}/{rows[-1]['chats']} completed, "
              f"{rows[-1]['refused_per_key_cap']} refused by the per-key cap", flush=True)
    return {"cap": cap, "fleet_limit": limit, "flood_threads": flood, "seconds": seconds, "rows": rows}


# -- 7. hostile backlog --------------------------------------------------------------------------
def _stage_topics() -> dict[str, tuple[str, str, str | None]]:
    """stage -> (consumer group, input topic, output topic whose request ids are counted)."""
    from services.common import topics

    return {
        # Beside the turn's path by default: it reads the requests and produces nothing.
        "tokenizer": ("colloquy-tokenizer", topics.CHAT_REQUESTS.name, None),
        "moderation-input": ("colloquy-moderation-input", topics.CHAT_REQUESTS.name, topics.CHAT_MODERATED.name),
        "prompt": ("colloquy-prompt", topics.CHAT_MODERATED.name, topics.CHAT_PROMPTS.name),
        "generation": ("colloquy-generation", topics.CHAT_PROMPTS.name, None),
        "moderation-output": ("colloquy-moderation-output", topics.GENERATION_PROGRESS.name, None),
    }


# The process each StageWorker stage runs in (its counters are on that process's /metrics page).
STAGE_SERVICE = {"tokenizer": "tokenizer", "moderation-input": "moderation", "prompt": "prompt",
                 "moderation-output": "moderation"}


class LagProbe:
    """Consumer lag as the stages would see it: committed records (read_committed) past each
    group's committed offset. end - committed is not it: a transactional topic's commit marker
    sits after the last record, so that difference never returns to 0."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaAdminClient, KafkaConsumer

        self.stages = _stage_topics()
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        self.reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                    isolation_level="read_committed", fetch_max_wait_ms=50)

    def close(self) -> None:
        self.reader.close()
        self.admin.close()

    def ends(self, topic: str) -> dict[Any, int]:
        from kafka import TopicPartition

        tps = [TopicPartition(topic, p) for p in sorted(self.reader.partitions_for_topic(topic) or [])]
        return dict(self.reader.end_offsets(tps))  # last stable offsets: read_committed

    def records(self, start: dict[Any, int], end: dict[Any, int], budget_s: float = 10.0) -> tuple[list[Any], int]:
        """Committed records from `start` up to `end` per partition, and how many offsets were
        left unread when `budget_s` ran out (0: all read)."""
        todo = [tp for tp, e in end.items() if e > start.get(tp, e)]
        if not todo:
            return [], 0
        self.reader.assign(todo)
        for tp in todo:
            self.reader.seek(tp, start[tp])
        got: list[Any] = []
        deadline = time.monotonic() + budget_s
        while any(self.reader.position(tp) < end[tp] for tp in todo) and time.monotonic() < deadline:
            for tp, recs in self.reader.poll(timeout_ms=200).items():
                got.extend(r for r in recs if r.offset < end[tp])
        left = sum(max(0, end[tp] - self.reader.position(tp)) for tp in todo)
        self.reader.assign([])
        return got, left

    def lag(self) -> dict[str, int]:
        """Records each stage has still to consume (an unread remainder counts as offsets)."""
        out: dict[str, int] = {}
        for stage, (group, topic, _) in self.stages.items():
            end = self.ends(topic)
            committed = self.admin.list_group_offsets({group: list(end)}).get(group, {})
            start = {tp: (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else e)
                     for tp, e in end.items()}
            got, left = self.records(start, end, budget_s=5.0)
            out[stage] = len(got) + left
        return out


    def foreign(self, instance: str) -> dict[str, list[str]]:
        """Members of each stage's group that are not this stack's replicas (their static ids end
        in another INSTANCE_ID): another stack on the same broker sharing the default groups
        takes partitions, and its work (or a rebalance between the two) is in the figures."""
        out: dict[str, list[str]] = {}
        try:
            described = self.admin.describe_groups([g for g, _, _ in self.stages.values()])
        except Exception:  # a diagnostic only
            return out
        for stage, (group, _, _) in self.stages.items():
            members = (described.get(group) or {}).get("members") or []
            ids = [m.get("group_instance_id") or m.get("client_id") or "?" for m in members]
            out[stage] = sorted(i for i in ids if not i.endswith(f"-{instance}"))
        return out


def keyed_request_id(key: int, client_request_id: str) -> str:
    """The request id the gateway gives a keyed chat that starts a conversation (derived from the
    key's user and the client key, services/gateway/idempotency.py): a chat refused before the
    pipeline's `started` never tells its client, and the backlog's outputs are matched by it."""
    import hashlib

    import yaml

    from services.gateway import idempotency

    plain = KEYS[key % len(KEYS)][1].removeprefix("Bearer ")
    digest = hashlib.sha256(plain.encode()).hexdigest()
    entries = yaml.safe_load((ROOT / "deploy" / "dev" / "api-keys.yaml").read_text())["keys"]
    user = next(e["user"] for e in entries if e["sha256"] == digest)
    return idempotency.request_id(user, idempotency.conversation_id(user, client_request_id), client_request_id)


def _request_ids(records: Iterable[Any]) -> list[str]:
    from services.common import events

    return [events.header(r.headers, events.H_REQUEST_ID) or "" for r in records]


def phase_backlog(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub, n: int, admission: int,
                  timeout_s: float, every_s: float = 2.0) -> dict[str, Any]:
    """`n` expensive chats at once, normal chats while they drain; lag sampled every `every_s`."""
    restart_gateway(stack, stub, CHAT_MAX_CONCURRENT=str(max(admission, n + 8)))  # the backlog is not refused
    probe = LagProbe(stack.bootstrap)
    try:
        settle_t0 = time.monotonic()
        while sum((before := probe.lag()).values()) and time.monotonic() - settle_t0 < 120:
            time.sleep(every_s)  # earlier phases' (or other runs') records first
        baseline = timed_chat(stub, "What is the capital of France?", 0)
        stage_io = {s: (inp, out) for s, (_, inp, out) in probe.stages.items()}
        topics_seen = sorted({t for pair in stage_io.values() for t in pair if t})
        ends0 = {t: probe.ends(t) for t in topics_seen}
        pages0 = {svc: scrape(stack, svc) for svc in set(STAGE_SERVICE.values())}
        kinds = ["8 KiB random-word sentences", "6 KiB plain sentences"]
        messages = [(kinds[i % 2], random_word_sentences(8192, 1000 + i) if i % 2 == 0 else plain_sentences(6144, i))
                    for i in range(n)]
        t0 = time.monotonic()
        pool = cf.ThreadPoolExecutor(n)
        keys = [uuid.uuid4().hex for _ in messages]  # keyed: each one's request id is known (keyed_request_id)
        futures = [pool.submit(timed_chat, stub, text, i, 24, keys[i], timeout=600)
                   for i, (_, text) in enumerate(messages)]
        samples: list[tuple[float, dict[str, int]]] = []
        normal: list[tuple[float, Timed]] = []  # (sent, seconds after the backlog), outcome
        stop = threading.Event()

        def normal_chats() -> None:
            """Normal chats while the backlog drains, one at a time, 8 s apart, from 3 s in."""
            stop.wait(3.0)
            while not stop.is_set() and len(normal) < 5:
                sent = time.monotonic() - t0
                normal.append((sent, timed_chat(stub, QUESTIONS[len(normal) % len(QUESTIONS)], len(normal) + 1)))
                stop.wait(8.0)

        talker = threading.Thread(target=normal_chats, daemon=True)
        talker.start()
        others: dict[str, set[str]] = {}
        while time.monotonic() - t0 < timeout_s:
            samples.append((round(time.monotonic() - t0, 1), probe.lag()))
            for stage, ids in probe.foreign(stack.instance).items():
                others.setdefault(stage, set()).update(ids)
            busy = not all(f.done() for f in futures) or sum(samples[-1][1].values()) > 0
            if not busy and len(samples) >= 2 and sum(samples[-2][1].values()) == 0:
                break
            time.sleep(every_s)
        stop.set()
        talker.join(300)
        outs = [f.result() for f in futures]
        pool.shutdown()
        ends1 = {t: probe.ends(t) for t in topics_seen}
        pages1 = {svc: scrape(stack, svc) for svc in set(STAGE_SERVICE.values())}
        window = {t: probe.records(ends0[t], ends1[t], budget_s=30.0) for t in topics_seen}
    finally:
        probe.close()
        restart_gateway(stack, stub, CHAT_MAX_CONCURRENT=str(admission))
    mine = {o.request_id for o in [baseline, *(o for _, o in normal)] if o.request_id}
    mine |= {keyed_request_id(i, k) for i, k in enumerate(keys)}
    stages = []
    for stage, (inp, out) in stage_io.items():
        row: dict[str, Any] = {"stage": stage, "topic": inp, "peak_lag": peak_lag(samples).get(stage, 0),
                               "records_in": len(window[inp][0])}
        svc = STAGE_SERVICE.get(stage)
        if svc:
            consumed = (metric_sum(pages1[svc], "colloquy_events_consumed_total", stage=stage, topic=inp)
                        - metric_sum(pages0[svc], "colloquy_events_consumed_total", stage=stage, topic=inp))
            row["processed"] = int(consumed)
            row["processed_again"] = int(consumed) - row["records_in"]  # a redone batch processes records twice
            row["batches_cut"] = int(metric_sum(pages1[svc], "colloquy_batches_cut_total", stage=stage)
                                     - metric_sum(pages0[svc], "colloquy_batches_cut_total", stage=stage))
        if out:  # only this phase's turns: records of another stack sharing the topics are not ours to judge
            ours = [i for i in _request_ids(window[out][0]) if i in mine]
            row["outputs"] = len(ours)
            row["outputs_repeated"] = repeats(ours)
        row["other_consumers"] = sorted(others.get(stage, set()))
        stages.append(row)
    by_kind = []
    for kind in kinds:
        ko = [o for (k, _), o in zip(messages, outs, strict=True) if k == kind]
        by_kind.append({"kind": kind, "chats": len(ko), "completed": sum(o.done and not o.moderated for o in ko),
                        "refused_by_input_moderation": sum(o.done and o.moderated == "input" for o in ko),
                        "cut_by_output_moderation": sum(o.done and o.moderated == "output" for o in ko),
                        "codes": {c: sum(o.code == c for o in ko) for c in sorted({o.code for o in ko})},
                        "details": sorted({o.detail[:120] for o in ko if o.detail}),
                        "latency_p50_s": pct([o.ended_at - o.started_at for o in ko], 0.5),
                        "latency_max_s": pct([o.ended_at - o.started_at for o in ko], 1.0)})
    answered = [Outcome(conversation=o.conversation, request_id=o.request_id, done=o.done) for o in outs if o.done]
    drained = drain_time(samples)
    print(f"backlog: {n} chats, drained in {drained} s; normal chats took "
          f"{[round(o.ended_at - o.started_at, 1) for _, o in normal]} s", flush=True)
    seen = [(o.request_id, keyed_request_id(i, k)) for i, (o, k) in enumerate(zip(outs, keys, strict=True))
            if o.request_id]
    return {"chats": n, "lag_before": before,
            "derived_request_ids_match": f"{sum(a == b for a, b in seen)}/{len(seen)}",
            "drained": drained is not None, "drain_s": drained,
            "all_backlog_ended_s": round(max(o.ended_at for o in outs) - t0, 1),
            "batch_time_budget_ms": stack.env("moderation").get("KAFKA_BATCH_TIME_BUDGET_MS"),
            "stages": stages, "by_kind": by_kind,
            "normal_before": {"done": baseline.done, "latency_s": round(baseline.ended_at - baseline.started_at, 2),
                              "ttft_s": round(baseline.ttft_s, 2) if baseline.ttft_s else None},
            "normal_during": [{"sent_at_s": round(sent, 1), "done": o.done, "code": o.code,
                               "ttft_s": round(o.ttft_s, 2) if o.ttft_s is not None else None,
                               "latency_s": round(o.ended_at - o.started_at, 2)} for sent, o in normal],
            "history": settled_history(stub, answered), "lag_samples": samples}


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
    lines += render_new(result)
    return "\n".join(lines) + "\n"


def render_new(result: dict[str, Any]) -> list[str]:
    """Rows of the idempotent, usercap and backlog phases (same table), then backlog's per-stage
    table. A row says how many tries each figure is out of: these are counts, not verdicts."""
    lines: list[str] = []
    idem = result.get("idempotent")
    if idem:
        names = {"replay": "replayed after the answer finished", "join": "joined while the first stream runs",
                 "sigkill": "after a gateway SIGKILL mid-stream (gateway restarted)"}
        for case, c in idem["cases"].items():
            extra = ""
            if case == "sigkill":
                restarts = [t["gateway_restart_s"] for t in idem["tries"][case]]
                extra = f"; gateway restart p50 {pct(restarts, 0.5)} s"
            lines.append(f"| idempotent retry, {names[case]} (under load) | {c['same_turn']}/{c['tries']} the same "
                         f"turn, {c['recorded_once']}/{c['tries']} recorded once, {c['extra_turns']} extra turns; "
                         f"retry answered p50 {c['retry_p50_s']} s, max {c['retry_max_s']} s{extra} |")
        h = idem["load_history"]
        lines.append(f"| idempotent retry: the load around it | {idem['load_chats']} chats, {h['turns_checked']} turns "
                     f"checked, {h['lost']} lost, {h['duplicated']} duplicated |")
    cap = result.get("usercap")
    if cap:
        for r in cap["rows"]:
            other = f", other errors: {'; '.join(r['refused_other'])}" if r["refused_other"] else ""
            lines.append(f"| per-user cap {cap['cap']} ({cap['flood_threads']}-thread flood by one key, "
                         f"{cap['seconds']:.0f} s): {r['who']} | {r['completed']}/{r['chats']} completed, "
                         f"{r['refused_per_key_cap']} refused by the per-key cap (p50 {r['refusal_p50_s']} s), most "
                         f"held at once {r['most_held_at_once']}; TTFT p50 {r['ttft_p50_s']} s, p99 {r['ttft_p99_s']} s"
                         f"{other} |")
    bl = result.get("backlog")
    if bl:
        kinds = ", ".join(f"{k['chats']} x {k['kind']}" for k in bl["by_kind"])
        peaks = ", ".join(f"{st['stage']} {st['peak_lag']}" for st in bl["stages"])
        lines.append(f"| hostile backlog: {bl['chats']} chats at once ({kinds}) | lag back to 0 on every stage: "
                     f"{bl['drained']}, **{bl['drain_s']} s** to drain (last backlog chat ended at "
                     f"{bl['all_backlog_ended_s']} s); peak lag: {peaks} |")
        again = sum(st.get("processed_again", 0) for st in bl["stages"])
        repeated = sum(st.get("outputs_repeated", 0) for st in bl["stages"])
        cut = ", ".join(f"{st['stage']} {st['batches_cut']}" for st in bl["stages"] if st.get("batches_cut"))
        lines.append(f"| hostile backlog: redone / duplicated | {again} records processed twice, {repeated} outputs "
                     f"written twice; batches committed in parts: {cut or 'none'} |")
        for k in bl["by_kind"]:
            codes = ", ".join(f"{c} {n}" for c, n in k["codes"].items())
            flagged = (f", {k.get('refused_by_input_moderation', 0)} refused by input moderation, "
                       f"{k.get('cut_by_output_moderation', 0)} cut by output moderation")
            lines.append(f"| hostile backlog: {k['kind']} | {k['completed']}/{k['chats']} answered{flagged} ({codes}); "
                         f"ended p50 {k['latency_p50_s']} s, max {k['latency_max_s']} s |")
        before = bl["normal_before"]
        during = "; ".join(f"sent at {o['sent_at_s']} s: {'done' if o['done'] else o['code']} in {o['latency_s']} s "
                           f"(TTFT {o['ttft_s']} s)" for o in bl["normal_during"])
        lines.append(f"| hostile backlog: normal chats sent during it | {during or 'none sent'} (before the backlog: "
                     f"{before['latency_s']} s) |")
        shared = sorted({i for st in bl["stages"] for i in st.get("other_consumers", [])})
        if shared:
            lines.append(f"| hostile backlog: **not this stack alone** | other consumers in the stages' groups during "
                         f"the phase (another stack on the same broker): {', '.join(shared)}; their work and the "
                         f"rebalances are in these figures |")
        h = bl["history"]
        lines.append(f"| hostile backlog: history of the answered | {h['turns_checked']} turns checked, {h['lost']} "
                     f"lost, {h['duplicated']} duplicated |")
        lines += ["", "Hostile backlog, per stage (lag: committed records past the group's committed offset; "
                  "processed twice: records the stage processed minus records that arrived; outputs: this "
                  "phase's turns on the stage's output topic)", "",
                  "| stage | input topic | peak lag | records in | processed | processed twice | batches cut | "
                  "outputs | outputs repeated |", "|---|---|---|---|---|---|---|---|---|"]
        for st in bl["stages"]:
            cells = [st["stage"], st["topic"], st["peak_lag"], st["records_in"], st.get("processed", "-"),
                     st.get("processed_again", "-"), st.get("batches_cut", "-"), st.get("outputs", "-"),
                     st.get("outputs_repeated", "-")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


PHASES = ("capacity", "load", "faults", "rolling", "fuzz", "idempotent", "usercap", "backlog")


def last_capacity() -> int | None:
    """The capacity the last search measured (bench/results/reliability.json), for runs without one."""
    try:
        return int(json.loads((RESULTS / "reliability.json").read_text())["capacity"]["capacity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    ap.add_argument("--retry-rounds", type=int, default=3, help="idempotent: rounds of replay, join and SIGKILL")
    ap.add_argument("--user-cap", type=int, default=2, help="usercap: CHAT_MAX_CONCURRENT_PER_USER for the phase")
    ap.add_argument("--flood", type=int, default=8, help="usercap: threads of the flooding key")
    ap.add_argument("--cap-seconds", type=float, default=30.0, help="usercap: seconds of flood")
    ap.add_argument("--backlog", type=int, default=48, help="backlog: expensive chats sent at once")
    ap.add_argument("--backlog-timeout", type=float, default=600.0, help="backlog: most seconds to wait for the drain")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    args = ap.parse_args()
    phases = args.phases.split(",")
    if unknown := sorted(set(phases) - set(PHASES)):
        ap.error(f"unknown phases: {', '.join(unknown)}")
    search = "capacity" in phases and not args.capacity
    if not search and not args.capacity:  # no search this run: the last one's figure is the limit
        args.capacity = last_capacity() or 0
    from devtools import kafka_broker

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    started_kafka = kafka_broker.ensure_broker(bootstrap)
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
            capacity = args.capacity
            if search:
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
            admission = int(stack.extra_env["gateway"]["CHAT_MAX_CONCURRENT"])
            if "idempotent" in phases:
                result["idempotent"] = phase_idempotent(stack, stub, args.clients, args.retry_rounds)
            if "usercap" in phases:
                result["usercap"] = phase_usercap(stack, stub, args.user_cap, args.flood, args.cap_seconds, admission)
            if "backlog" in phases:
                result["backlog"] = phase_backlog(stack, stub, args.backlog, admission, args.backlog_timeout)
    finally:
        result["load_average_end"] = os.getloadavg()
        result["seconds"] = round(time.time() - result["started_unix"], 1)  # the whole run, stack start excluded
        stack.stop()
        kafka_broker.release_broker(started_kafka, bootstrap)
        lock.__exit__(None, None, None)
        write_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
