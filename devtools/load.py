"""A bounded chat load on the real stack, and the history check after it.

Shared by the fault and restart tests (tests/pipeline/test_reliability.py) and `make reliability`
(bench/reliability.py), so both count lost and duplicated turns the same way. Loopback only; every
client runs until stopped, and every outcome is kept.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

import grpc
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

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


def settled_history(stub: chat_pb2_grpc.ChatServiceStub, outcomes: list[Outcome],
                    wait_s: float = 30.0) -> dict[str, float]:
    """history_check, asked again for up to `wait_s` while turns look lost: a turn whose `done`
    the client has just seen can take a moment to be readable in the history (a gateway just
    restarted reads it back first; after a broker restart the conversation store's consumer
    rejoins its group, and the gateway's read-your-writes wait of 5 s can run out first). How
    long that took is reported (``settle_s``); a turn still missing is lost."""
    t0 = time.monotonic()
    while True:
        h: dict[str, float] = dict(history_check(stub, outcomes))
        if not h["lost"] or time.monotonic() - t0 >= wait_s:
            h["settle_s"] = round(time.monotonic() - t0, 1)
            return h
        time.sleep(2.0)


