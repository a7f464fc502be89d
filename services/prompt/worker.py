"""The prompt stage: chat.moderated -> chat.prompts (or a recorded refusal for blocked messages).

For each turn: wait until the history holds every committed turn of the conversation (turn N+1
must see turn N), check the owner, claim the next turn index, then either record the blocked
turn with a polite refusal or assemble the prompt and pass the turn on to generation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from colloquy.v1 import chat_pb2, common_pb2, events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge, Histogram

from services.common import events, kafka_loop, safety, topics, turns
from services.common.config import KafkaConfig
from services.conversation.reader import StoreReader
from services.prompt.config import PromptConfig
from services.prompt.domain import DEFAULT_ANSWER_BUDGET, Assembler, conversation_seed, past_turns
from services.prompt.history import Found, HistoryUnavailable, lookup, lookup_many
from services.prompt.pending import ConversationNotFound, TurnInProgress, TurnTracker
from services.prompt.templates import PromptTemplate, TemplateSet
from services.tokenizer.domain import InvalidArgument

log = logging.getLogger(__name__)

STAGE = "prompt"

PROMPT_TOKENS = Histogram(
    "colloquy_prompt_tokens", "Tokens in each assembled prompt",
    buckets=(16, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 16384))
DROPPED_TURNS = Counter("colloquy_prompt_dropped_turns_total",
                        "Earlier turns left out of prompts to fit the model's context")
TURNS = Counter("colloquy_prompt_turns_total", "Turns handled by the prompt stage, by outcome",
                ["outcome"])
PENDING = Gauge("colloquy_prompt_pending_turns", "Turns assigned an index but not yet recorded")
UNANSWERED = Counter("colloquy_prompt_unanswered_turns_total",
                     "Pending turns freed because generation gave up on them (chat.unanswered)")


UNMODERATED = "the message was not checked by moderation, so it was not answered"


def moderated(turn: events_pb2.TurnEvent) -> bool:
    """Input moderation decided on this turn (it always sets an action; unset means it never ran)."""
    return (turn.HasField("input_moderation")
            and turn.input_moderation.action != common_pb2.MODERATION_ACTION_UNSPECIFIED)


def answer_budget(turn: events_pb2.TurnEvent) -> int:
    return turn.sampling.max_tokens if turn.sampling.HasField("max_tokens") else DEFAULT_ANSWER_BUDGET


def candidates(turn: events_pb2.TurnEvent) -> int:
    return turn.sampling.n if turn.sampling.HasField("n") and turn.sampling.n > 0 else 1


def blocked_events(turn: events_pb2.TurnEvent, template: PromptTemplate,
                   traceparent: str) -> list[events.OutEvent]:
    """A refused message: the turn is recorded with a polite refusal, and the caller is told why.
    A message refused for self-harm also gets where to find help, in the notice and the record."""
    n = candidates(turn)
    refusal = template.refusal
    if safety.needs_crisis_line(turn.input_moderation):
        refusal += " " + safety.CRISIS_LINE
    created = Timestamp()
    created.GetCurrentTime()
    record = events_pb2.TurnRecord(
        conversation_id=turn.conversation_id, user_id=turn.user_id,
        turn=chat_pb2.Turn(
            index=turn.turn_index, user_message=turn.message,
            answers=[chat_pb2.Answer(index=i, text=refusal, finish_reason="blocked")
                     for i in range(n)],
            created_at=created, template_version=template.version, blocked=True,
            request_id=turn.request_id, seed=turn.seed if turn.turn_index == 1 else None))
    notice = chat_pb2.ModerationNotice(stage="input", result=turn.input_moderation,
                                       message=refusal)
    done = chat_pb2.ChatDone(
        finish_reasons=[chat_pb2.FinishReasonEntry(index=i, reason="blocked") for i in range(n)],
        usage=common_pb2.Usage(prompt_tokens=0, completion_tokens=0),
        template_version=template.version)
    return [
        turns.turn_record_event(record, turn.request_id, traceparent),
        turns.reply(turn, traceparent, started=turns.started(turn)),
        turns.reply(turn, traceparent, moderation=notice),
        turns.reply(turn, traceparent, done=done),
    ]


class HistoryPrefetch:
    """The stage's `prepare`: every conversation of a polled batch looked up behind one
    read-your-writes wait (`lookup_many`), kept for the handler. The wait starts after every
    record of the batch was consumed, so it covers each of them as a wait of its own would.

    When that wait fails (store unreachable, or behind after HISTORY_WAIT_SECONDS), each turn of
    the batch is answered UNAVAILABLE at once: it has waited as long as its own wait would have,
    and N turns do not wait N more times in turn."""

    def __init__(self, reader: StoreReader, cfg: PromptConfig) -> None:
        self.reader, self.cfg = reader, cfg
        self.found: dict[tuple[str, str], Found | HistoryUnavailable] = {}

    def __call__(self, batch: list[events_pb2.TurnEvent]) -> None:
        self.found = {}
        wanted = list(dict.fromkeys((t.conversation_id, t.user_id) for t in batch
                                    if t.conversation_id and moderated(t) and not turns.deadline_passed(t)))
        if len(wanted) > 1:
            try:
                self.found = dict(lookup_many(self.reader, wanted, self.cfg.history_wait_s))
            except HistoryUnavailable as exc:
                self.found = dict.fromkeys(wanted, exc)

    def lookup(self, conversation_id: str, user_id: str) -> tuple[str | None, dict[int, chat_pb2.Turn]]:
        found = self.found.get((conversation_id, user_id))
        if found is None:
            return lookup(self.reader, conversation_id, user_id, self.cfg.history_wait_s)
        if isinstance(found, ConversationNotFound):
            raise ConversationNotFound(conversation_id)
        if isinstance(found, HistoryUnavailable):
            raise HistoryUnavailable(str(found))
        return found


def make_handler(assembler: Assembler, templates: TemplateSet, tracker: TurnTracker,
                 reader: StoreReader, cfg: PromptConfig, clock: Callable[[], int] = turns.now_ms,
                 prefetch: HistoryPrefetch | None = None) -> kafka_loop.Handler[events_pb2.TurnEvent]:
    """The stage's handler; every refusal is a StageError reply, never a dead letter. With
    `prefetch` (the worker's `prepare`), histories it looked up are not looked up again."""
    history = prefetch or HistoryPrefetch(reader, cfg)

    def fail(ev: kafka_loop.Consumed[events_pb2.TurnEvent], code: str, message: str,
             outcome: str) -> events.OutEvent:
        TURNS.labels(outcome).inc()
        return turns.reply_error(ev.message, code, message, STAGE, ev.traceparent)

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]) -> Iterator[events.OutEvent]:
        turn = ev.message
        if not turn.reply_topic or not turn.conversation_id:
            # Nobody could be told about this turn; dead-letter it rather than wedge the partition.
            raise events.PoisonEvent("TurnEvent without reply_topic or conversation_id")
        if turns.deadline_passed(turn):
            TURNS.labels("deadline").inc()
            yield turns.deadline_error(turn, STAGE, ev.traceparent)
            return
        if not moderated(turn):
            # Fail closed: a turn that skipped input moderation (a misrouted topic, a stage bug)
            # must never reach the model as if it had been allowed.
            log.error("turn without an input moderation decision; refused", extra={"stage": STAGE})
            yield fail(ev, "INTERNAL", UNMODERATED, "unmoderated")
            return
        blocked = turn.input_moderation.action == common_pb2.MODERATION_ACTION_BLOCK
        now = clock()
        try:
            owner, recorded = history.lookup(turn.conversation_id, turn.user_id)
            claim = tracker.assign(request_id=turn.request_id, conversation_id=turn.conversation_id,
                                   user_id=turn.user_id, owner=owner, recorded=recorded, now_ms=now,
                                   expires_ms=tracker.expiry(now, turn.deadline_unix_ms), blocked=blocked)
        except HistoryUnavailable as exc:
            yield fail(ev, "UNAVAILABLE", f"{exc}; try again", "unavailable")
            return
        except ConversationNotFound:
            yield fail(ev, "NOT_FOUND", "conversation not found", "not_found")
            return
        except TurnInProgress:
            yield fail(ev, "ABORTED", "a turn is already being answered in this conversation", "busy")
            return
        finally:
            PENDING.set(len(tracker))
        if claim.already_recorded:
            # The turn was answered and recorded already: a replay must not answer it twice.
            log.info("turn already recorded; skipping", extra={"turn_index": claim.index})
            TURNS.labels("duplicate").inc()
            return
        out = events_pb2.TurnEvent()
        out.CopyFrom(turn)
        out.turn_index = claim.index
        template = templates.get()
        out.template_version = template.version
        if blocked:
            TURNS.labels("blocked").inc()
            yield from blocked_events(out, template, ev.traceparent)
            return
        if claim.index != 1:
            out.ClearField("seed")  # only turn 1 records the conversation's seed
        system, seeded = conversation_seed(recorded, out.seed)
        try:
            assembled = assembler.assemble(template, seeded + past_turns(recorded.values()), turn.message,
                                           answer_budget(turn), budget_field="sampling.max_tokens",
                                           system=system)
        except InvalidArgument as exc:
            tracker.release(turn.request_id)
            PENDING.set(len(tracker))
            yield fail(ev, "INVALID_ARGUMENT", str(exc), "invalid")
            return
        out.prompt = assembled.prompt
        out.answer_stops[:] = template.answer_stops
        out.prompt_tokens = assembled.prompt_tokens
        out.dropped_turns = assembled.dropped_turns
        PROMPT_TOKENS.observe(assembled.prompt_tokens)
        DROPPED_TURNS.inc(assembled.dropped_turns)
        TURNS.labels("assembled").inc()
        yield events.OutEvent(cfg.topic_out, turn.conversation_id, out, request_id=turn.request_id,
                              traceparent=ev.traceparent)
        yield turns.reply(out, ev.traceparent, started=turns.started(out))

    return handle


def make_worker(handler: kafka_loop.Handler[events_pb2.TurnEvent], cfg: PromptConfig, kafka: KafkaConfig,
                instance_id: str, prefetch: HistoryPrefetch | None = None
                ) -> kafka_loop.StageWorker[events_pb2.TurnEvent]:
    return kafka_loop.StageWorker(STAGE, [cfg.topic_in], events_pb2.TurnEvent, handler, kafka,
                                  group_id=cfg.group_id, instance_id=instance_id, prepare=prefetch)


def make_unanswered_handler(tracker: TurnTracker) -> kafka_loop.Handler[events_pb2.TurnUnanswered]:
    """Frees the conversation of a turn generation gave up on, so a retry is not refused ABORTED
    until the turn expires (nothing will ever record that turn in the history)."""

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnUnanswered]) -> list[events.OutEvent]:
        msg = ev.message
        if tracker.forget_unanswered(msg.request_id, msg.conversation_id):
            UNANSWERED.inc()
            PENDING.set(len(tracker))
            log.info("turn unanswered by generation; conversation freed", extra={"code": msg.code})
        return []

    return handle


def make_unanswered_worker(handler: kafka_loop.Handler[events_pb2.TurnUnanswered], cfg: PromptConfig,
                           kafka: KafkaConfig, instance_id: str) -> kafka_loop.StageWorker[events_pb2.TurnUnanswered]:
    """Reads every partition of chat.unanswered: a group of its own per replica, because the
    replica holding a turn is whichever owns its chat.moderated partition, which another
    group's assignment cannot follow. Releasing a turn another replica holds is a no-op."""
    return kafka_loop.StageWorker(f"{STAGE}-unanswered", [topics.CHAT_UNANSWERED.name], events_pb2.TurnUnanswered,
                                  handler, kafka, group_id=f"{cfg.group_id}-unanswered-{instance_id}",
                                  instance_id=instance_id)
