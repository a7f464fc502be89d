"""Rebalances under load (issue 22 item 2): add and remove stage replicas while clients chat.

One whole stack (``common.stack``: the test harness, under the stack lock, the served model).
``--rb-clients`` clients each hold conversations of ``--rb-turns`` turns (``--rb-tokens``
max_tokens, greedy) through the gateway until the end. After ``--rb-dwell`` s of steady load,
for each stage of ``--rb-stages`` in turn: add a replica (Stack.add_replica, timed from the
start to SERVING), dwell, remove it by SIGTERM, dwell, add it again, dwell, remove it by
SIGKILL, dwell ``--rb-kill-dwell`` s (longer than the consumers' 10 s session timeout, so the
killed member's partitions have moved).

Every chat's outcome is kept (a stream that ends without ``done`` and without a gRPC error is
"unclear"). Afterwards every conversation is read back through GetConversation: a turn the
client saw ``done`` for and the history lacks is lost; a request id or turn index recorded twice
is duplicated; a done turn without answer text, or indexes that are not 1..n, are counted too.
Each chat is charged to the action whose window it started in. The stall of an action is the
longest gap between two completed turns (any client) from the action's start to the end of its
window, beside the longest gap in the steady window before the first action: this is the
pipeline's stall as the users saw it, not a per-stage event clock.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import common
from bench.common import Record, log

NAME = "rebalance"
ACTIONS = ("add", "sigterm", "readd", "sigkill")
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 plus 2?",
             "Say hello in Spanish.", "What do bees make?", "What is ice made of?"]


@dataclass
class Chat:
    """One Chat call as the client saw it (times are time.monotonic())."""

    client: int
    turn: int  # the client's 1-based turn in its conversation (expected index if all succeed)
    started: float
    conversation: str = ""
    request_id: str = ""
    code: str = "OK"
    detail: str = ""
    done: bool = False
    ended: float = 0.0


@dataclass
class Action:
    stage: str
    action: str
    process: str
    started: float
    ended: float = 0.0  # the end of its window (the next action's start)
    took_s: float = 0.0  # add: start to SERVING; remove: signal to exit
    exit_code: int | None = None


@dataclass
class Driver:
    """Clients holding multi-turn conversations until stopped."""

    target: str
    clients: int
    turns: int
    max_tokens: int
    chats: list[Chat] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Driver:
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(k,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _client(self, k: int) -> None:
        import grpc
        from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        with grpc.insecure_channel(self.target) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            conv, turn, asked = "", 1, 0
            while not self.stop.is_set():
                c = Chat(client=k, turn=turn, started=time.monotonic(), conversation=conv)
                self.chats.append(c)
                req = chat_pb2.ChatRequest(conversation_id=conv, message=QUESTIONS[(k + asked) % len(QUESTIONS)],
                                           sampling=sampling)
                asked += 1
                try:
                    for ev in stub.Chat(req, metadata=common.DEV_KEY, timeout=180, wait_for_ready=True):
                        kind = ev.WhichOneof("event")
                        if kind == "started":
                            c.conversation, c.request_id = ev.started.conversation_id, ev.started.request_id
                        elif kind == "done":
                            c.done = True
                except grpc.RpcError as exc:
                    c.code, c.detail = exc.code().name, exc.details() or ""
                c.ended = time.monotonic()
                if c.done:
                    conv, turn = c.conversation, turn + 1
                    if turn > self.turns:
                        conv, turn = "", 1
                else:
                    if c.code == "NOT_FOUND":
                        conv, turn = "", 1
                    time.sleep(0.5)  # back off, then continue the same conversation

    def finish(self, timeout: float = 200) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


# -- counting (pure: unit-tested in bench/test_bench.py) ----------------------------------------
def check_history(chats: Iterable[Chat], turns: dict[str, list[tuple[int, str, bool]]]) -> dict[str, dict[str, int]]:
    """Per request id: {"lost", "duplicated", "no_answer", "bad_index"} (0/1 counts).

    `turns`: per conversation, its recorded turns as (index, request_id, has answer text).
    Lost: done for the client, absent from the history. Duplicated: the request id recorded more
    than once, or its index shared with another recorded turn. Bad index: the conversation's
    indexes are not 1..n and this turn sits past the first hole.
    """
    out: dict[str, dict[str, int]] = {}
    by_rid: dict[str, dict[str, list[tuple[int, str, bool]]]] = {}
    for conv, rows in turns.items():
        for row in rows:
            by_rid.setdefault(row[1], {}).setdefault(conv, []).append(row)
    for conv, rows in turns.items():
        indexes = sorted(r[0] for r in rows)
        first_hole = next((i + 1 for i, x in enumerate(indexes) if x != i + 1), None)
        counts: dict[int, int] = {}
        for r in rows:
            counts[r[0]] = counts.get(r[0], 0) + 1
        for idx, rid, has_answer in rows:
            o = out.setdefault(rid, {"lost": 0, "duplicated": 0, "no_answer": 0, "bad_index": 0})
            o["duplicated"] = int(len(by_rid[rid][conv]) > 1 or counts[idx] > 1)
            o["no_answer"] = int(not has_answer)
            o["bad_index"] = int(first_hole is not None and idx >= first_hole)
    for c in chats:
        if not c.request_id:
            continue
        o = out.setdefault(c.request_id, {"lost": 0, "duplicated": 0, "no_answer": 0, "bad_index": 0})
        if c.done and c.request_id not in by_rid:
            o["lost"] = 1
    return out


def max_gap(times: Iterable[float], lo: float, hi: float) -> float:
    """The longest stretch of [lo, hi] with no time in `times` (its ends count as edges)."""
    pts = [lo, *sorted(t for t in times if lo < t < hi), hi]
    return round(max(b - a for a, b in itertools.pairwise(pts)), 2) if hi > lo else 0.0


def tally(chats: list[Chat], actions: list[Action], history: dict[str, dict[str, int]],
          steady: tuple[float, float]) -> list[dict[str, Any]]:
    """One row per action (and the steady window first): chats, answered, errors, unclear, lost,
    duplicated, no_answer, bad_index, stall (longest gap between completed turns)."""
    done_at = [c.ended for c in chats if c.done]
    windows = [("steady", "-", steady[0], steady[1], None)]
    windows += [(a.stage, a.action, a.started, a.ended, a) for a in actions]
    rows = []
    for stage, action, lo, hi, a in windows:
        mine = [c for c in chats if lo <= c.started < hi]
        row: dict[str, Any] = {"stage": stage, "action": action, "window_s": round(hi - lo, 1), "chats": len(mine),
                               "answered": sum(c.done for c in mine),
                               "errors": sum(not c.done and c.code != "OK" for c in mine),
                               "unclear": sum(not c.done and (c.code == "OK" or not c.detail) for c in mine)}
        for k in ("lost", "duplicated", "no_answer", "bad_index"):
            row[k] = sum(history.get(c.request_id, {}).get(k, 0) for c in mine if c.request_id)
        row["stall_s"] = max_gap(done_at, lo, hi)
        if a is not None:
            row["process"], row["took_s"], row["exit_code"] = a.process, round(a.took_s, 2), a.exit_code
        row["error_codes"] = sorted({f"{c.code}: {c.detail[:80]}" for c in mine if not c.done})
        rows.append(row)
    return rows


# -- the run ------------------------------------------------------------------------------------
def read_history(target: str, conversations: Iterable[str]) -> dict[str, list[tuple[int, str, bool]]]:
    """Every conversation's recorded turns (all pages) as check_history takes them."""
    import grpc
    from colloquy.v1 import chat_pb2, chat_pb2_grpc

    out: dict[str, list[tuple[int, str, bool]]] = {}
    with grpc.insecure_channel(target) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        for conv in conversations:
            rows: list[tuple[int, str, bool]] = []
            token = ""
            while True:
                req = chat_pb2.GetConversationRequest(conversation_id=conv, page_token=token, page_size=1000)
                for attempt in range(30):
                    try:
                        view = stub.GetConversation(req, metadata=common.DEV_KEY, timeout=30)
                        break
                    except grpc.RpcError as exc:  # the key's rate limit (600/min): wait, as it says
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 29:
                            raise
                        time.sleep(1.1)
                rows += [(t.index, t.request_id, any(a.text for a in t.answers)) for t in view.turns]
                token = view.next_page_token
                if not token:
                    break
            out[conv] = rows
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    stage_names = [s.strip() for s in args.rb_stages.split(",") if s.strip()]
    params = {"clients": args.rb_clients, "turns": args.rb_turns, "max_tokens": args.rb_tokens,
              "dwell_s": args.rb_dwell, "kill_dwell_s": args.rb_kill_dwell, "stages": stage_names}
    rec = Record(NAME, params)
    try:
        params["model_version"] = common.served_model()[1]
    except Exception as exc:  # a label only
        params["model_version"] = f"unknown ({exc})"
    with common.stack() as s:
        driver = Driver(s.gateway, args.rb_clients, args.rb_turns, args.rb_tokens)
        driver.start()
        log(f"rebalance: {args.rb_clients} clients chatting; steady {args.rb_dwell} s")
        time.sleep(args.rb_dwell)  # warm-up: the first turns pay the model's first calls
        steady0 = time.monotonic()
        time.sleep(args.rb_dwell)
        steady = (steady0, time.monotonic())
        actions: list[Action] = []

        def act(stage: str, action: str, dwell: float) -> None:
            t0 = time.monotonic()
            if action in ("add", "readd"):
                a = Action(stage, action, "", t0)
                a.process = s.add_replica(stage)
            else:
                a = Action(stage, action, s.replicas_of(stage)[-1], t0)
                a.exit_code = s.remove_replica(a.process, signal.SIGTERM if action == "sigterm" else signal.SIGKILL)
            a.took_s = time.monotonic() - t0
            if actions:
                actions[-1].ended = t0
            actions.append(a)
            log(f"  {stage} {action} {a.process}: {a.took_s:.1f} s (exit {a.exit_code}); "
                f"{sum(c.done for c in driver.chats)} turns answered so far")
            time.sleep(dwell)

        for stage in stage_names:
            for action in ACTIONS:
                act(stage, action, args.rb_kill_dwell if action == "sigkill" else args.rb_dwell)
        actions[-1].ended = time.monotonic()
        log("rebalance: stopping the clients")
        driver.finish()
        time.sleep(3)  # the materializer records the last turns
        chats = list(driver.chats)
        convs = sorted({c.conversation for c in chats if c.conversation})
        history = check_history(chats, read_history(s.gateway, convs))
    rows = tally(chats, actions, history, steady)
    totals = {k: sum(r[k] for r in rows) for k in ("chats", "answered", "errors", "unclear", "lost", "duplicated",
                                                    "no_answer", "bad_index")}
    totals["conversations"] = len(convs)
    totals["unfinished"] = sum(1 for c in chats if not c.ended)
    rec.results.update(rows=rows, totals=totals)
    doc = rec.finish()
    print(render(doc))
    (common.RESULTS / f"{NAME}.md").write_text(markdown(doc), encoding="utf-8")
    return doc


HEAD = ["stage", "action", "process", "took s", "chats", "answered", "errors", "unclear", "lost", "dup",
        "no answer", "bad index", "stall s", "window s"]


def _rows(doc: dict[str, Any]) -> list[list[Any]]:
    return [[r["stage"], r["action"], r.get("process", "-"), r.get("took_s"), r["chats"], r["answered"], r["errors"],
             r["unclear"], r["lost"], r["duplicated"], r["no_answer"], r["bad_index"], r["stall_s"], r["window_s"]]
            for r in doc["results"]["rows"]]


def render(doc: dict[str, Any]) -> str:
    return (f"\nrebalance under load ({doc['params']['clients']} clients, {doc['params']['turns']}-turn "
            f"conversations, max_tokens {doc['params']['max_tokens']}, model {doc['params'].get('model_version')}):\n"
            + common.table(_rows(doc), HEAD) + f"\ntotals: {doc['results']['totals']}\n")


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    errs = sorted({e for r in doc["results"]["rows"] for e in r["error_codes"]})
    return "\n".join([
        "# Rebalances under load (issue 22 item 2)", "",
        f"Run {doc['started']}, {doc['seconds']} s, load {m['loadavg_before'][0]} -> {m['loadavg_after'][0]} on "
        f"{m['cpus']} CPUs ({'noisy: shared' if doc['noisy'] else 'shared with other sessions'}); "
        f"`make bench BENCH=rebalance`. {doc['params']['clients']} clients, conversations of "
        f"{doc['params']['turns']} turns, max_tokens {doc['params']['max_tokens']}, served model "
        f"{doc['params'].get('model_version')}; dwell {doc['params']['dwell_s']} s after each action "
        f"({doc['params']['kill_dwell_s']} s after SIGKILL).", "",
        "Each chat is charged to the action whose window it started in. Lost: done for the client, absent "
        "from GetConversation; dup: a request id or turn index recorded twice; stall: the longest gap "
        "between two completed turns (any client) in the window (the steady row: before any action); "
        "took: add = start to SERVING, remove = signal to exit.", "",
        common.markdown_table(_rows(doc), HEAD), "",
        f"Totals: {doc['results']['totals']}", "",
        "Errors seen: " + ("; ".join(errs) if errs else "none"), ""])


def add_args(g: Any) -> None:
    g.add_argument("--rb-clients", type=int, default=4, help="chat clients during the rebalances")
    g.add_argument("--rb-turns", type=int, default=3, help="turns per conversation")
    g.add_argument("--rb-tokens", type=int, default=8, help="max_tokens per chat")
    g.add_argument("--rb-dwell", type=float, default=10.0, help="seconds of load after each action")
    g.add_argument("--rb-kill-dwell", type=float, default=15.0, help="seconds of load after a SIGKILL")
    g.add_argument("--rb-stages", default="tokenizer,moderation,prompt,conversation",
                   help="stages to add and remove replicas of, in order")
