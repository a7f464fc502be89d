"""The tokenizer stage against the real broker, as its own process on its own topics: beside the
turn's path (the default: it counts and produces nothing) and in the chain (TOKENIZER_TOPIC_OUT)."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import pytest
from colloquy.v1 import common_pb2, events_pb2

from devtools.procs import Proc, free_port
from services.common import events, turns
from services.tokenizer.domain import TextTokenizer
from tests.common.kafka_util import create, produce, read_all, read_to_end

pytestmark = pytest.mark.kafka


def turn(i: int, message: str, reply_topic: str, deadline: int = 0) -> events_pb2.TurnEvent:
    return events_pb2.TurnEvent(
        request_id=f"req-{i}", conversation_id=f"00000000-0000-4000-8000-00000000000{i}", user_id="u1",
        message=message, sampling=common_pb2.SamplingParams(max_tokens=16), reply_topic=reply_topic,
        deadline_unix_ms=deadline, accepted_unix_ms=turns.now_ms())


def test_in_the_chain_the_stage_counts_message_tokens_and_drops_expired_turns(
        kafka_bootstrap: str, unique: str, tokenizer_path: Path, tok: TextTokenizer) -> None:
    t_in, t_out, replies = f"t.requests.{unique}", f"t.tokenized.{unique}", f"t.replies.{unique}"
    create(kafka_bootstrap, t_in, t_out, replies)
    proc = Proc("services.tokenizer", {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "GRPC_PORT": "0", "METRICS_PORT": "0",
        "TOKENIZER_PATH": str(tokenizer_path), "TOKENIZER_TOPIC_IN": t_in, "TOKENIZER_TOPIC_OUT": t_out,
        "TOKENIZER_GROUP_ID": f"g.tokenizer.{unique}", "INSTANCE_ID": unique})
    try:
        proc.wait_for(lambda out: "partitions assigned" in out, timeout=60)
        messages = ["Hello there!", "My dog is called Biscuit. What is a good toy for him?", "ünïcödé 🐕"]
        sent = [turn(i, m, replies, deadline=turns.now_ms() + 60_000) for i, m in enumerate(messages)]
        expired = turn(7, "too late", replies, deadline=turns.now_ms() - 1000)
        produce(kafka_bootstrap, t_in, [(t.conversation_id, t) for t in [*sent, expired]])

        out = read_all(kafka_bootstrap, t_out, expect=3, settle=1.0)
        errors = read_all(kafka_bootstrap, replies, expect=1, settle=0.5)
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    got = {e.request_id: e for e in (events.decode(r.value, r.headers, events_pb2.TurnEvent) for r in out)}
    assert sorted(got) == ["req-0", "req-1", "req-2"], "the expired turn must not be passed on"
    for t in sent:
        e = got[t.request_id]
        assert e.message_tokens == tok.count(t.message) > 0
        e.ClearField("message_tokens")
        assert e == t, "every other field passes through unchanged"
    for r in out:
        assert r.key.decode() == events.decode(r.value, r.headers, events_pb2.TurnEvent).conversation_id
        assert events.header(r.headers, "request-id").startswith("req-")

    [err] = [events.decode(r.value, r.headers, events_pb2.ReplyEvent) for r in errors]
    assert err.request_id == "req-7"
    assert err.error.code == "DEADLINE_EXCEEDED" and err.error.stage == "tokenizer"


def test_beside_the_path_the_stage_only_counts(
        kafka_bootstrap: str, unique: str, tokenizer_path: Path, tok: TextTokenizer) -> None:
    """The default: every record of chat.requests is counted in the histogram and committed; no
    record goes anywhere, not even an expired turn's error (input moderation answers it) or an
    undecodable record (input moderation dead-letters it: one copy on the dead-letter topic)."""
    from kafka import KafkaAdminClient

    from services.common import topics

    t_in, replies = f"t.requests.{unique}", f"t.replies.{unique}"
    group = f"g.tokenizer.{unique}"
    create(kafka_bootstrap, t_in, replies)
    topics.ensure_topics(kafka_bootstrap, [topics.DEAD_LETTER])
    metrics_port = free_port()
    proc = Proc("services.tokenizer", {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "GRPC_PORT": "0", "METRICS_PORT": str(metrics_port),
        "TOKENIZER_PATH": str(tokenizer_path), "TOKENIZER_TOPIC_IN": t_in, "TOKENIZER_GROUP_ID": group,
        "INSTANCE_ID": unique})
    messages = ["Hello there!", "My dog is called Biscuit. What is a good toy for him?", "too late"]
    sent = [turn(0, messages[0], replies, deadline=turns.now_ms() + 60_000), turn(1, messages[1], ""),
            turn(2, messages[2], replies, deadline=turns.now_ms() - 1000)]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        proc.wait_for(lambda out: "partitions assigned" in out, timeout=60)
        produce(kafka_bootstrap, t_in, [(t.conversation_id, t) for t in sent] + [("poison", b"\xff\xfe not protobuf")])
        deadline = time.monotonic() + 60
        committed = 0
        while time.monotonic() < deadline:
            committed = sum(m.offset for m in (admin.list_group_offsets({group: None}).get(group) or {}).values())
            if committed >= len(sent) + 1:
                break
            time.sleep(0.5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        admin.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert committed == len(sent) + 1, "every record is consumed and committed, the undecodable one too"
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in page.splitlines()
               if line.startswith(("colloquy_tokenizer_message_tokens_", "colloquy_events_"))}
    assert samples["colloquy_tokenizer_message_tokens_count"] == len(sent)
    assert samples["colloquy_tokenizer_message_tokens_sum"] == sum(tok.count(m) for m in messages)
    assert samples[f'colloquy_events_consumed_total{{stage="tokenizer",topic="{t_in}"}}'] == len(sent) + 1
    assert samples[f'colloquy_events_failed_total{{stage="tokenizer",topic="{t_in}"}}'] == 1
    assert read_all(kafka_bootstrap, replies, expect=0, settle=1.0) == [], "nobody is answered from beside the path"
    dead = [r for r in read_to_end(kafka_bootstrap, topics.DEAD_LETTER.name)
            if events.header(r.headers, "dlq-topic") == t_in]
    assert dead == [], "the undecodable record is input moderation's to dead-letter, not a second copy from here"
