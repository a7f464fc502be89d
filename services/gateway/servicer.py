"""ChatService over gRPC: authenticate, limit, validate, publish the turn (or join or replay a keyed
retry's turn), relay its replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import sqlalchemy.exc
from colloquy.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaProducer

from services.common import events, kafka_loop, retry_hint, topics, turns
from services.common.auth import Identity, KeyRing, key_from_metadata
from services.conversation import domain as store_domain
from services.conversation.db import ConversationDB, Owner
from services.conversation.deletion import Eraser
from services.conversation.reader import StoreReader
from services.gateway import errors, idempotency, metrics, validation
from services.gateway.admission import Admission
from services.gateway.chat_stream import ChatEnd, ChatStream, Limits
from services.gateway.config import GatewayConfig
from services.gateway.moderation_guard import ModerationGuard
from services.gateway.ratelimit import RateLimiter
from services.gateway.replies import ReplyRouter

log = logging.getLogger(__name__)

NOT_FOUND = "conversation not found"
MAX_PAGE_TOKEN = 512  # far above any token the store makes (a short base64 JSON array)
MODERATION_DOWN = ("moderation is unavailable, so messages cannot be checked; nothing was sent to the model. "
                   "Retry shortly")
HISTORY_POLL_S = 1.0  # how often a keyed chat with no reply looks for its turn in the history
HISTORY_WAIT_S = 5.0  # read-your-writes: how long a reader waits for the store to catch up
STORE_BEHIND = "this conversation's history is still being saved; retry in a few seconds"


class StoreBehind(Exception):
    """The store did not show, within HISTORY_WAIT_S, that it holds every turn committed to a
    conversation's partition: whether the conversation exists is not known yet (UNAVAILABLE, not
    NOT_FOUND: a user whose first turn was answered while the store lagged must not be told their
    conversation does not exist)."""


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, cfg: GatewayConfig, keys: KeyRing, store: StoreReader, router: ReplyRouter,
                 producer: KafkaProducer, reply_topic: str, moderation: ModerationGuard | None = None) -> None:
        self.cfg = cfg
        self.moderation = moderation
        self.limiter = (RateLimiter(cfg.user_rate_per_minute / 60.0, cfg.user_burst)
                        if cfg.user_rate_per_minute > 0 else None)
        self.keys = keys
        self.store = store
        self.db: ConversationDB = store.db
        self.eraser = Eraser(store.db, producer, turns_topic=store.topic)
        self.router = router
        self.producer = producer
        self.reply_topic = reply_topic
        # conversation id -> (request id, message) of the turn this replica is answering in it
        self.in_flight: dict[str, tuple[str, str]] = {}
        self.admission = Admission(cfg.max_concurrent_chats, cfg.max_chats_per_user)
        self._history = _StoreHistory(self)
        self._pipeline = _KafkaPipeline(self)

    # -- helpers -------------------------------------------------------------------------------
    async def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        key = key_from_metadata(context.invocation_metadata())
        who = self.keys.identity(key) if key else None
        if who is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer <key>'")
        return who  # type: ignore[return-value]

    async def _user(self, context: grpc.aio.ServicerContext) -> str:
        return (await self._caller(context)).user

    async def _rate_limit(self, user: str, context: grpc.aio.ServicerContext) -> None:
        """RESOURCE_EXHAUSTED with a retry hint (message and `retry-after` trailer) when over the limit."""
        wait = self.limiter.take(user) if self.limiter is not None else 0.0
        if wait > 0:
            metrics.REFUSED.labels("rate_limit").inc()
            secs = retry_hint.seconds(wait)
            context.set_trailing_metadata(retry_hint.trailer(secs))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"rate limit: too many requests for this API key; retry after {secs}s")

    async def _internal(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """An unexpected error: logged with its traceback, the caller gets INTERNAL in plain words
        (grpcio would send "Unexpected <class ...>: <text>" with UNKNOWN)."""
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, StoreBehind):  # nothing was published yet: a retry is safe, and hinted
            metrics.REFUSED.labels("store_behind").inc()
            await _abort_retryable(context, grpc.StatusCode.UNAVAILABLE, STORE_BEHIND)
        if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
                      | sqlalchemy.exc.TimeoutError):
            # The database is down, restarting or out of connections: a retry can succeed.
            log.warning("conversation store unreachable", extra={"error": repr(exc)[:300]})
            await _abort_retryable(context, grpc.StatusCode.UNAVAILABLE,
                                   "the conversation store is not reachable right now; retry shortly")
        log.error("unexpected error in a ChatService call", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, errors.internal_error(""))

    async def _invalid(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _blocking(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run a blocking store call off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _owner(self, conversation_id: str) -> Owner | None:
        """The conversation's owner, waiting (bounded) for the store to hold every turn committed
        to its partition when the store does not know it: a conversation another replica just
        started, or a store that lags. None: the store has caught up and does not know it.
        Raises StoreBehind when it did not catch up in time or could not be asked. Blocking."""
        owner = self.db.owner(conversation_id)
        if owner is None:
            partition = topics.partition_for(conversation_id, topics.CONVERSATION_TURNS.partitions)
            try:
                caught_up = self.store.wait_caught_up([partition], HISTORY_WAIT_S)
            except Exception as exc:
                log.warning("could not wait for the conversation store", extra={"error": repr(exc)[:300]})
                raise StoreBehind(conversation_id) from exc
            if not caught_up:
                log.warning("the conversation store lags behind the history topic",
                            extra={"conversation_id": conversation_id, "partition": partition})
                raise StoreBehind(conversation_id)
            owner = self.db.owner(conversation_id)
        return owner

    async def _turn_stored(self, conversation_id: str, index: int) -> bool:
        """Wait (at most HISTORY_WAIT_S) until the store holds the turn. Polls from the event
        loop, one quick query per try, so waiting streams hold no executor thread."""
        deadline = time.monotonic() + HISTORY_WAIT_S
        pause = 0.005
        while not await self._blocking(self.db.turn_recorded, conversation_id, index):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        return True

    def _is_callers(self, conversation_id: str, user: str) -> bool:
        owner = self._owner(conversation_id)
        return owner is not None and owner.user_id == user and not owner.deleted

    async def _caller_conversation(self, conversation_id: str, context: grpc.aio.ServicerContext,
                                   user: str = "") -> tuple[str, str]:
        """Authenticate (unless `user` is given), rate-limit, validate the id and return (user, id);
        NOT_FOUND if not the caller's. The limit comes before the lookup, so probing ids costs the
        caller's budget."""
        if not user:
            user = await self._user(context)
            await self._rate_limit(user, context)
        try:
            conv = validation.conversation_id(conversation_id)
        except validation.InvalidArgument as exc:
            await self._invalid(context, exc)
        if not await self._blocking(self._is_callers, conv, user):
            await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
        return user, conv

    async def _publish(self, out: events.OutEvent) -> None:
        await kafka_loop.publish(self.producer, out, timeout=10)

    def _cancel(self, request_id: str, conversation_id: str, reason: str) -> None:
        """Fire-and-forget: generation stops this request within one decode step."""
        msg = events_pb2.CancelEvent(request_id=request_id, conversation_id=conversation_id, reason=reason)
        try:
            self.producer.send(topics.CHAT_CANCELS.name, key=conversation_id.encode(),
                               value=msg.SerializeToString(),
                               headers=events.OutEvent(topics.CHAT_CANCELS.name, conversation_id, msg,
                                                       request_id=request_id).headers())
        except Exception:
            log.warning("could not publish a cancel event", exc_info=True)

    # -- RPCs ----------------------------------------------------------------------------------
    async def Chat(self, request: chat_pb2.ChatRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[chat_pb2.ChatEvent]:
        user = await self._user(context)
        await self._rate_limit(user, context)
        refusal = self.admission.acquire(user)  # before any lookup or await: no race for a slot
        if refusal == "capacity":
            metrics.REFUSED.labels("capacity").inc()
            await _abort_retryable(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the gateway is at capacity ({self.cfg.max_concurrent_chats} chats); retry shortly")
        elif refusal is not None:
            metrics.REFUSED.labels("user_concurrency").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"too many chats at once for this API key (at most {self.cfg.max_chats_per_user} on one gateway); "
                "wait for one to finish"))
        try:
            async with contextlib.aclosing(self._chat(user, request, context)) as chat:
                async for ev in chat:
                    yield ev
        except Exception as exc:
            await self._internal(context, exc)
        finally:
            self.admission.release(user)

    async def _chat(self, user: str, request: chat_pb2.ChatRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[chat_pb2.ChatEvent]:
        try:
            conv, text, sampling = validation.chat_request(request, self.cfg)
        except validation.InvalidArgument as exc:
            await self._invalid(context, exc)
        key = request.client_request_id
        derived = idempotency.conversation_id(user, key) if key else ""
        if conv and conv != derived:
            if not await self._blocking(self._is_callers, conv, user):
                await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
        elif key:  # the conversation this key starts: new, or the one an earlier try started
            conv = derived
            try:
                owner = await self._blocking(self._owner, conv)  # None while its first turn is not recorded
            except StoreBehind:  # unknown yet: answered as a new conversation, as an unrecorded one is
                owner = None
            if owner is not None and (owner.user_id != user or owner.deleted):
                await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
        else:
            conv = str(uuid.uuid4())
        request_id = idempotency.request_id(user, conv, key) if key else uuid.uuid4().hex
        done_turn = await self._blocking(self.db.turn_by_request, conv, user, request_id) if key else None
        if done_turn is not None:  # answered already: the same turn again, nothing new is sent
            await self._same_message(context, done_turn.user_message, text)
            metrics.IDEMPOTENT_RETRIES.labels("replayed").inc()
            metrics.CHATS.labels("OK").inc()
            for out in idempotency.replay(done_turn, conv, {}, started=False):
                yield out
            return
        joining = self.in_flight.get(conv, ("", ""))[0] == request_id  # a retry of a stream held here
        if not joining and self.moderation is not None and await self.moderation.confirm_unavailable():
            metrics.REFUSED.labels("moderation_unavailable").inc()
            await _abort_retryable(context, grpc.StatusCode.UNAVAILABLE, MODERATION_DOWN)
        holder = self.in_flight.get(conv)  # from here to the claim below: no await
        if holder is not None and holder[0] != request_id:
            await context.abort(grpc.StatusCode.ABORTED,
                                "a turn is already being answered in this conversation; wait for it to finish")
        attached = holder is not None  # a retry reaching the replica that holds its stream
        if attached:
            await self._same_message(context, holder[1], text)
            metrics.IDEMPOTENT_RETRIES.labels("attached").inc()
        else:
            self.in_flight[conv] = (request_id, text)  # no await since the check above
        queue = self.router.register(request_id)
        metrics.ACTIVE_CHATS.inc()
        accepted = time.perf_counter()
        code = "OK"
        try:
            remaining = context.time_remaining()
            budget = self.cfg.default_deadline_s if remaining is None else min(remaining, self.cfg.default_deadline_s)
            deadline = time.time() + budget
            turn = None if attached else events_pb2.TurnEvent(
                request_id=request_id, conversation_id=conv, user_id=user, message=text, sampling=sampling,
                reply_topic=self.reply_topic, deadline_unix_ms=int(deadline * 1000),
                accepted_unix_ms=turns.now_ms(),
                seed=request.seed if request.HasField("seed") else None)
            stream = ChatStream(queue, self._history, self._pipeline, conversation_id=conv, user=user,
                                request_id=request_id, accepted=accepted, limits=Limits(
                                    deadline, self.cfg.reply_idle_timeout_s, self.cfg.check_timeout_s,
                                    HISTORY_POLL_S if key else None))
            async with contextlib.aclosing(stream.run(turn)) as relayed:  # closed with this one, at once
                async for out in relayed:
                    yield out
        except ChatEnd as end:
            code = end.status.name
            await _abort_retryable(context, end.status, end.message)
        except (asyncio.CancelledError, GeneratorExit):  # see ChatStream.run
            code = "CANCELLED"
            raise
        finally:
            metrics.ACTIVE_CHATS.dec()
            metrics.CHATS.labels(code).inc()
            metrics.CHAT_DURATION.observe(time.perf_counter() - accepted)
            self.router.unregister(request_id, queue)
            held = self.in_flight.get(conv)
            if held is not None and held[0] == request_id and not self.router.listeners(request_id):
                del self.in_flight[conv]

    def _give_up(self, request_id: str, conversation_id: str, reason: str) -> None:
        """Stop generating for a stream that ends unanswered, unless a retry still listens to it."""
        if self.router.listeners(request_id) <= 1:
            self._cancel(request_id, conversation_id, reason)

    async def _same_message(self, context: grpc.aio.ServicerContext, earlier: str, text: str) -> None:
        """A key names one message: reusing it for another is a client bug, not a retry."""
        if earlier != text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "client_request_id: already used for a different message in this conversation; "
                                "use a new key for a new message")

    async def GetConversation(self, request: chat_pb2.GetConversationRequest,
                              context: grpc.aio.ServicerContext) -> chat_pb2.Conversation:
        try:
            user = await self._user(context)
            await self._rate_limit(user, context)
            await self._check_page(context, request.page_size, request.page_token)
            user, conv = await self._caller_conversation(request.conversation_id, context, user)
            try:
                page = await self._blocking(self.db.get_conversation, conv, user, request.page_size,
                                            request.page_token)
            except ValueError as exc:  # a token for another conversation
                await self._invalid(context, _page_error(exc))
            if page is None:  # deleted since the check above
                await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
            return chat_pb2.Conversation(conversation_id=conv, turns=page.turns, next_page_token=page.next_page_token)
        except Exception as exc:
            await self._internal(context, exc)
            raise

    async def _check_page(self, context: grpc.aio.ServicerContext, size: int, token: str) -> None:
        """INVALID_ARGUMENT for a negative page size or a token no listing of this service made."""
        if size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be >= 0 (0 means the default, 50)")
        if len(token) > MAX_PAGE_TOKEN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "page_token: not a token this service returned (too long)")

    async def ListConversations(self, request: chat_pb2.ListConversationsRequest,
                                context: grpc.aio.ServicerContext) -> chat_pb2.ListConversationsResponse:
        try:
            user = await self._user(context)
            await self._rate_limit(user, context)
            await self._check_page(context, request.page_size, request.page_token)
            try:
                page = await self._blocking(self.db.list_conversations, user, request.page_size, request.page_token)
            except ValueError as exc:
                await self._invalid(context, _page_error(exc))
            return chat_pb2.ListConversationsResponse(
                conversations=[chat_pb2.ConversationSummary(
                    conversation_id=c.conversation_id, title=c.title, created_at=_timestamp(c.created_ms),
                    last_activity_at=_timestamp(c.last_activity_ms)) for c in page.conversations],
                next_page_token=page.next_page_token)
        except Exception as exc:
            await self._internal(context, exc)
            raise

    async def DeleteConversation(self, request: chat_pb2.DeleteConversationRequest,
                                 context: grpc.aio.ServicerContext) -> chat_pb2.DeleteConversationResponse:
        try:
            user, conv = await self._caller_conversation(request.conversation_id, context)
            if conv in self.in_flight:
                await context.abort(grpc.StatusCode.ABORTED,
                                    "a turn is being answered in this conversation; delete it when the turn is done")
            try:
                deleted = await self._blocking(self.eraser.erase, conv, user, "user")
            except Exception:
                log.exception("could not delete a conversation", extra={"conversation_id": conv})
                await _abort_retryable(context, grpc.StatusCode.UNAVAILABLE,
                                       "the conversation could not be deleted now; nothing was removed from it. "
                                       "Retry shortly")
            if deleted is None:  # deleted by a concurrent call
                await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
            return chat_pb2.DeleteConversationResponse(deleted_turns=deleted)
        except Exception as exc:
            await self._internal(context, exc)
            raise

    async def SubmitFeedback(self, request: chat_pb2.SubmitFeedbackRequest,
                             context: grpc.aio.ServicerContext) -> chat_pb2.SubmitFeedbackResponse:
        try:
            return await self._submit_feedback(request, context)
        except Exception as exc:
            await self._internal(context, exc)
            raise

    async def _submit_feedback(self, request: chat_pb2.SubmitFeedbackRequest,
                               context: grpc.aio.ServicerContext) -> chat_pb2.SubmitFeedbackResponse:
        who = await self._caller(context)
        await self._rate_limit(who.user, context)
        source = _source(context)
        if source == "simulated" and not who.labeler:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, (
                "this API key may not submit simulated feedback (x-colloquy-feedback-source: simulated): "
                "only keys marked 'labeler: true' in the key file may; drop the header to submit it as yours"))
        user, conv = await self._caller_conversation(request.conversation_id, context, who.user)
        stored = await self._blocking(self.db.get_turn, conv, user, request.turn_index)
        turn = stored.turn if stored is not None else None
        try:
            validation.feedback(request, turn)
        except validation.InvalidArgument as exc:
            await self._invalid(context, exc)
        feedback_id = uuid.uuid4().hex
        ev = events_pb2.FeedbackEvent(
            feedback_id=feedback_id, user_id=user, conversation_id=conv, turn_index=request.turn_index,
            prompt=stored.prompt, answers=turn.answers,
            model_version=turn.model_version, template_version=turn.template_version,
            source=source, created_unix_ms=turns.now_ms())
        if request.HasField("rating"):
            ev.rating.CopyFrom(request.rating)
        else:
            ev.ranking.CopyFrom(request.ranking)
        try:
            await self._publish(events.OutEvent(topics.CHAT_FEEDBACK.name, conv, ev, event_id=feedback_id))
        except Exception:
            await _abort_retryable(context, grpc.StatusCode.UNAVAILABLE, "could not record the feedback; retry shortly")
        return chat_pb2.SubmitFeedbackResponse(feedback_id=feedback_id)


class _StoreHistory:
    """chat_stream.History over this servicer's conversation store."""

    def __init__(self, servicer: ChatServicer) -> None:
        self._s = servicer

    async def turn_by_request(self, conversation_id: str, user: str, request_id: str) -> chat_pb2.Turn | None:
        return await self._s._blocking(self._s.db.turn_by_request, conversation_id, user, request_id)

    async def turn_stored(self, conversation_id: str, index: int) -> bool:
        return await self._s._turn_stored(conversation_id, index)


class _KafkaPipeline:
    """chat_stream.Pipeline over this servicer's Kafka producer."""

    def __init__(self, servicer: ChatServicer) -> None:
        self._s = servicer

    async def publish(self, turn: events_pb2.TurnEvent) -> None:
        await self._s._publish(events.OutEvent(topics.CHAT_REQUESTS.name, turn.conversation_id, turn,
                                               request_id=turn.request_id))

    def give_up(self, request_id: str, conversation_id: str, reason: str) -> None:
        self._s._give_up(request_id, conversation_id, reason)


async def _abort_retryable(context: grpc.aio.ServicerContext, status: grpc.StatusCode, message: str) -> NoReturn:
    """Abort with `status`, and the `retry-after` hint when a plain retry can cure it."""
    if (secs := errors.retry_after(status)) is not None:
        context.set_trailing_metadata(retry_hint.trailer(secs))
    await context.abort(status, message)
    raise AssertionError("context.abort returned")  # it raises; this keeps NoReturn honest


def _page_error(exc: ValueError) -> ValueError:
    """A store's page error in the caller's words (which field is wrong)."""
    if isinstance(exc, store_domain.InvalidPageToken):
        return ValueError(f"page_token: {exc}; start again with an empty page_token")
    return ValueError(f"page_size: {exc}")


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def _source(context: grpc.aio.ServicerContext) -> str:
    """Feedback from the simulated-labeler tool says so in metadata (honoured for labeler keys
    only: the servicer refuses it from others); everything else is human."""
    for k, v in context.invocation_metadata() or ():
        if k == "x-colloquy-feedback-source" and v == "simulated":
            return "simulated"
    return "human"
