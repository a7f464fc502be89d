"""The tokenizer stage: counts each new message's tokens (`colloquy_tokenizer_message_tokens`).

By default it reads chat.requests beside the turn's path and produces nothing: no stage downstream
reads `message_tokens` (the prompt stage counts the whole prompt with the same tokenizer), and a
transactional hop in front of input moderation cost every turn 3.5-16 ms of time to first token
(bench/results/pipeline.md). With `TOKENIZER_TOPIC_OUT` set it is a stage of the chain again:
chat.requests -> that topic with `message_tokens` set, and expired turns answered with
DEADLINE_EXCEEDED (input moderation must then read that topic: `MODERATION_INPUT_TOPIC_IN`).
"""

from __future__ import annotations

from collections.abc import Iterator

from colloquy.v1 import events_pb2
from prometheus_client import Histogram

from services.common import events, kafka_loop, turns
from services.common.config import KafkaConfig
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.domain import TextTokenizer

STAGE = "tokenizer"

MESSAGE_TOKENS = Histogram(
    "colloquy_tokenizer_message_tokens", "Tokens in each new user message",
    buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))


def make_handler(tok: TextTokenizer, topic_out: str) -> kafka_loop.Handler[events_pb2.TurnEvent]:
    """The stage's handler in the chain: count the message's tokens and pass the turn on to
    `topic_out`; an expired turn is answered DEADLINE_EXCEEDED."""

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]) -> Iterator[events.OutEvent]:
        turn = ev.message
        if not turn.reply_topic:
            # Nobody could be told about this turn; dead-letter it rather than wedge the partition.
            raise events.PoisonEvent("TurnEvent without reply_topic")
        if turns.deadline_passed(turn):
            yield turns.deadline_error(turn, STAGE, ev.traceparent)
            return
        out = events_pb2.TurnEvent()
        out.CopyFrom(turn)
        out.message_tokens = tok.count(turn.message)
        MESSAGE_TOKENS.observe(out.message_tokens)
        # The turn's own request id, so the header is right even if an upstream producer left it out.
        yield events.OutEvent(topic_out, ev.key or turn.conversation_id, out, request_id=turn.request_id,
                              traceparent=ev.traceparent)

    return handle


def make_worker(tok: TextTokenizer, cfg: TokenizerConfig, kafka: KafkaConfig,
                instance_id: str) -> kafka_loop.StageWorker[events_pb2.TurnEvent] | kafka_loop.ObserverWorker:
    """In the chain (`TOKENIZER_TOPIC_OUT` set) a transactional stage; beside the path (the
    default) an observer: it counts every turn and answers nobody (input moderation owns the
    turn's errors and dead-letters what cannot be read; `kafka_loop.ObserverWorker` says why)."""
    if not cfg.topic_out:
        return kafka_loop.ObserverWorker(STAGE, [cfg.topic_in], events_pb2.TurnEvent,
                                         lambda turn: MESSAGE_TOKENS.observe(tok.count(turn.message)), kafka,
                                         group_id=cfg.group_id, instance_id=instance_id)
    return kafka_loop.StageWorker(STAGE, [cfg.topic_in], events_pb2.TurnEvent,
                                  make_handler(tok, cfg.topic_out), kafka,
                                  group_id=cfg.group_id, instance_id=instance_id)
