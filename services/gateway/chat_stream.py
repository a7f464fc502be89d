"""One Chat call's stream after admission and the in-flight claim: publish the turn, relay its
replies as ChatEvents, end it on time.

Its collaborators are the small interfaces below, so its decisions (deadline, idle and checks
timeouts, cancel on give-up or client disconnect, cumulative text into deltas, `started` first,
a keyed retry's replay from the history, read-your-writes before `done`) are tested without a
broker or a store (tests/gateway/test_chat_logic.py); the servicer wires the real ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from colloquy.v1 import chat_pb2, events_pb2

from services.gateway import errors, idempotency, metrics

log = logging.getLogger(__name__)

CHECKS_TIMEOUT = ("the message was not checked by moderation within {s:.0f}s; it was cancelled and not answered. "
                  "Retry shortly")


class ChatEnd(Exception):
    """The stream ends with this status and message (the servicer aborts the call with them)."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Replies(Protocol):
    """This request's replies in arrival order (the reply router's queue)."""

    async def get(self) -> events_pb2.ReplyEvent: ...


class History(Protocol):
    """The conversation store, as the stream reads it."""

    async def turn_by_request(self, conversation_id: str, user: str,
                              request_id: str) -> chat_pb2.Turn | None: ...

    async def turn_stored(self, conversation_id: str, index: int) -> bool:
        """Whether the store holds the turn, waiting (bounded) for it to catch up."""
        ...


class Pipeline(Protocol):
    """The chat pipeline: where the turn goes and where a stream ending unanswered is stopped."""

    async def publish(self, turn: events_pb2.TurnEvent) -> None: ...

    def give_up(self, request_id: str, conversation_id: str, reason: str) -> None: ...


@dataclass(frozen=True)
class Limits:
    """`deadline` is unix seconds; `poll_s` (keyed chats only) is how often a stream with no
    reply looks for its turn in the history, None for never."""

    deadline: float
    reply_idle_s: float
    check_s: float
    poll_s: float | None


class ChatStream:
    """Relays one turn. `finished` says whether the turn reached its end (done, error or replay),
    so a cancel after it stops nothing."""

    def __init__(self, replies: Replies, history: History, pipeline: Pipeline, *, conversation_id: str,
                 user: str, request_id: str, limits: Limits, accepted: float) -> None:
        self.replies, self.history, self.pipeline = replies, history, pipeline
        self.conv, self.user, self.request_id = conversation_id, user, request_id
        self.limits = limits
        self.accepted = accepted  # time.perf_counter() when the call was accepted
        self.finished = False

    async def run(self, turn: events_pb2.TurnEvent | None) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Publish `turn` (None: a retry attached to a stream already published) and relay its
        replies; raises ChatEnd for a stream that ends with an error status."""
        try:
            if turn is not None:
                try:
                    await self.pipeline.publish(turn)
                except Exception as exc:
                    log.exception("could not publish the turn")
                    metrics.REFUSED.labels("unavailable").inc()
                    raise ChatEnd(grpc.StatusCode.UNAVAILABLE, "the chat pipeline is unavailable; retry shortly") \
                        from exc
            async for ev in self._relay():
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away. gRPC cancels the handler's task wherever it waits: in here
            # (CancelledError), or while it writes the event just yielded, and then this generator
            # is only closed at that yield (GeneratorExit).
            if not self.finished:
                self.pipeline.give_up(self.request_id, self.conv, "client-cancelled")
            raise

    async def _relay(self) -> AsyncIterator[chat_pb2.ChatEvent]:
        lim, conv, rid = self.limits, self.conv, self.request_id
        # A keyed turn may end where this replica cannot hear it (a gateway that was killed
        # sent it, or the prompt stage found it recorded already): look in the history too.
        poll = lim.poll_s
        sent: dict[int, int] = {}
        # A retry of a turn still being answered can hear the first try's replies (on this
        # replica's reply topic) before its own `started`: they wait here until it comes.
        early: list[events_pb2.ReplyEvent] = []
        ready: collections.deque[events_pb2.ReplyEvent] = collections.deque()
        started = False
        first_text = True
        turn_index = 0
        last_reply = time.perf_counter()
        while True:
            now = time.perf_counter()
            left = lim.deadline - time.time()
            if left <= 0:
                self.pipeline.give_up(rid, conv, "deadline")
                raise ChatEnd(grpc.StatusCode.DEADLINE_EXCEEDED, "the answer did not finish in time")
            wait = min(left, last_reply + lim.reply_idle_s - now)
            if not started:
                wait = min(wait, self.accepted + lim.check_s - now)
            wait = max(0.0, wait)
            slice_s = min(wait, poll) if poll is not None else wait
            try:
                ev = ready.popleft() if ready else await asyncio.wait_for(self.replies.get(), timeout=slice_s)
            except TimeoutError:
                if poll is not None and (done_turn := await self.history.turn_by_request(
                        conv, self.user, rid)) is not None:
                    self.finished = True
                    metrics.IDEMPOTENT_RETRIES.labels("replayed").inc()
                    for out in idempotency.replay(done_turn, conv, sent, started):
                        yield out
                    return
                if slice_s < wait or lim.deadline - time.time() <= 0:
                    continue
                if not started:  # never cleared the checks: fail closed, do not leave it queued
                    self.pipeline.give_up(rid, conv, "checks-timeout")
                    metrics.REFUSED.labels("moderation_timeout").inc()
                    raise ChatEnd(grpc.StatusCode.UNAVAILABLE, CHECKS_TIMEOUT.format(s=lim.check_s)) from None
                self.pipeline.give_up(rid, conv, "stalled")
                raise ChatEnd(grpc.StatusCode.UNAVAILABLE,
                              f"no progress from the pipeline for {lim.reply_idle_s:.0f}s") from None
            last_reply = time.perf_counter()
            kind = ev.WhichOneof("reply")
            # `started` goes first (the contract): input moderation's warning reaches this replica
            # before the prompt stage's start, and a retry can hear the first try's replies
            # before its own; both wait here until it comes.
            if not started and (kind == "moderation" or (poll is not None and kind in ("text", "retraction", "done"))):
                early.append(ev)
                continue
            if kind == "started":
                turn_index = ev.started.turn_index
                if not started:
                    started = True
                    yield chat_pb2.ChatEvent(started=ev.started)
                    ready.extend(early)
                    early.clear()
            elif kind == "text":
                already = sent.get(ev.text.index, 0)
                if len(ev.text.text) > already:
                    if first_text:
                        first_text = False
                        metrics.TTFT.observe(time.perf_counter() - self.accepted)
                    metrics.STREAMED_CHARS.inc(len(ev.text.text) - already)
                    sent[ev.text.index] = len(ev.text.text)
                    yield chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(index=ev.text.index, text=ev.text.text[already:]))
            elif kind == "retraction":  # stream-first moderation cut text this stream already sent
                if sent.get(ev.retraction.index, 0) > ev.retraction.kept_chars:
                    sent[ev.retraction.index] = ev.retraction.kept_chars
                    yield chat_pb2.ChatEvent(retraction=ev.retraction)
            elif kind == "moderation":
                yield chat_pb2.ChatEvent(moderation=ev.moderation)
            elif kind == "done":
                self.finished = True
                # Read-your-writes: a GetConversation or next turn right after `done` must
                # see this turn, so wait (briefly) for the history to hold its record.
                if turn_index and not await self.history.turn_stored(conv, turn_index):
                    log.warning("history lags behind a finished turn", extra={"conversation_id": conv,
                                                                              "turn": turn_index})
                yield chat_pb2.ChatEvent(done=ev.done)
                return
            elif kind == "error":
                self.finished = True
                status, public = errors.stage_error(ev.error, rid)
                log.warning("a stage failed the turn", extra={
                    "stage": ev.error.stage, "code": ev.error.code, "error": ev.error.message, "request_id": rid})
                raise ChatEnd(status, public)
