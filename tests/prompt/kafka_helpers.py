"""Helpers for prompt tests against the real broker: history records, filtered reads, the process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from colloquy.v1 import chat_pb2, common_pb2, events_pb2
from google.protobuf.message import Message
from kafka import KafkaConsumer

from devtools.procs import Proc
from services.common import events, kafka_loop, topics, turns
from services.common.config import KafkaConfig
from tests.common.kafka_util import create

M = TypeVar("M", bound=Message)


def record(conversation_id: str, user_id: str, index: int, user: str, answer: str,
           request_id: str = "") -> events_pb2.TurnRecord:
    """A finished turn as output moderation writes it."""
    return events_pb2.TurnRecord(conversation_id=conversation_id, user_id=user_id, turn=chat_pb2.Turn(
        index=index, user_message=user, request_id=request_id or f"old-{index}", template_version="v1",
        answers=[chat_pb2.Answer(index=0, text=answer, finish_reason="stop")]))


def write_records(bootstrap: str, records: list[events_pb2.TurnRecord]) -> None:
    """Append turns to the real history topic, keyed and partitioned as the pipeline does."""
    topics.ensure_topics(bootstrap, [topics.CONVERSATION_TURNS])
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=bootstrap), "test-history")
    try:
        for rec in records:
            out = turns.turn_record_event(rec)
            producer.send(out.topic, key=out.key.encode(), value=rec.SerializeToString(),
                          headers=out.headers(), partition=out.partition)
        producer.flush()
    finally:
        producer.close()


def turn_event(conversation_id: str, user_id: str, request_id: str, message: str, reply_topic: str,
               *, blocked: bool = False, deadline_ms: int | None = None,
               max_tokens: int = 64) -> events_pb2.TurnEvent:
    """A TurnEvent as input moderation passes it on."""
    action = common_pb2.MODERATION_ACTION_BLOCK if blocked else common_pb2.MODERATION_ACTION_ALLOW
    return events_pb2.TurnEvent(
        request_id=request_id, conversation_id=conversation_id, user_id=user_id, message=message,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, n=1),
        reply_topic=reply_topic, accepted_unix_ms=turns.now_ms(), message_tokens=5,
        deadline_unix_ms=turns.now_ms() + 120_000 if deadline_ms is None else deadline_ms,
        input_moderation=common_pb2.ModerationResult(flagged=blocked, action=action, policy_version="p1"))


def collect(bootstrap: str, topic: str, cls: type[M], match: Callable[[M], bool], expect: int,
            timeout: float = 60.0, settle: float = 1.0) -> list[M]:
    """Committed records of `topic` that decode as `cls` and match; waits for `expect`, then `settle`s."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed", fetch_max_wait_ms=50)
    found: list[M] = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                for r in recs:
                    if r.value is None or events.header(r.headers, "event-type") != cls.DESCRIPTOR.full_name:
                        continue
                    msg = events.decode(r.value, r.headers, cls)
                    if match(msg):
                        found.append(msg)
            if len(found) >= expect and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        consumer.close()
    return found


def collect_now(bootstrap: str, topic: str, cls: type[M], match: Callable[[M], bool],
                timeout: float = 30.0) -> list[M]:
    """Every matching record committed so far (reads up to the end offsets taken now).

    For absence checks: once a later event's output is visible, an earlier one's would be too.
    """
    from kafka import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", fetch_max_wait_ms=50)
    found: list[M] = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            for recs in consumer.poll(timeout_ms=200).values():
                for r in recs:
                    if r.value is None or events.header(r.headers, "event-type") != cls.DESCRIPTOR.full_name:
                        continue
                    msg = events.decode(r.value, r.headers, cls)
                    if match(msg):
                        found.append(msg)
    finally:
        consumer.close()
    return found


class PromptStage:
    """`python -m services.prompt` on its own input/output topics and consumer group."""

    def __init__(self, bootstrap: str, unique: str, tokenizer_path: Path, **env: str) -> None:
        self.bootstrap = bootstrap
        self.topic_in, self.topic_out = f"t.moderated.{unique}", f"t.prompts.{unique}"
        self.replies = f"t.replies.{unique}"
        create(bootstrap, self.topic_in, self.topic_out, self.replies)
        topics.ensure_topics(bootstrap, [topics.CONVERSATION_TURNS, topics.CHAT_UNANSWERED])
        self.env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "GRPC_PORT": "0", "METRICS_PORT": "0",
                    "TOKENIZER_PATH": str(tokenizer_path), "PROMPT_TOPIC_IN": self.topic_in,
                    "PROMPT_TOPIC_OUT": self.topic_out, "PROMPT_GROUP_ID": f"g.prompt.{unique}",
                    "INSTANCE_ID": f"prompt-{unique}", **env}
        self.proc: Proc | None = None

    def start(self) -> PromptStage:
        self.proc = Proc("services.prompt", self.env)
        # Two workers: the stage, and its chat.unanswered reader.
        self.proc.wait_for(lambda out: out.count("partitions assigned") >= 2, timeout=90)
        return self

    def send(self, *turn_events: events_pb2.TurnEvent) -> None:
        from tests.common.kafka_util import produce

        produce(self.bootstrap, self.topic_in, [(t.conversation_id, t) for t in turn_events])

    def prompts(self, request_id: str, expect: int = 1, **kw: float) -> list[events_pb2.TurnEvent]:
        return collect(self.bootstrap, self.topic_out, events_pb2.TurnEvent,
                       lambda e: e.request_id == request_id, expect, **kw)

    def prompts_now(self, request_id: str) -> list[events_pb2.TurnEvent]:
        return collect_now(self.bootstrap, self.topic_out, events_pb2.TurnEvent,
                           lambda e: e.request_id == request_id)

    def unanswered(self, turn: events_pb2.TurnEvent, code: str = "RESOURCE_EXHAUSTED") -> None:
        """What generation publishes when it gives up on a turn (chat.unanswered)."""
        from tests.common.kafka_util import produce

        produce(self.bootstrap, topics.CHAT_UNANSWERED.name, [(turn.conversation_id, events_pb2.TurnUnanswered(
            request_id=turn.request_id, conversation_id=turn.conversation_id, code=code, stage="generation"))])

    def replies_for(self, request_id: str, expect: int, **kw: float) -> list[events_pb2.ReplyEvent]:
        return collect(self.bootstrap, self.replies, events_pb2.ReplyEvent,
                       lambda e: e.request_id == request_id, expect, **kw)
