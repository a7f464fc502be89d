"""Both moderation stages against the real broker, the service running as its own process.

The pipeline topics are shared with other tests running at the same time: every read starts at
the end offsets taken before the test produced anything, and keeps only this test's request ids.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from colloquy.v1 import common_pb2, events_pb2, generation_pb2
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from devtools.procs import Proc, free_port
from services.common import events, topics
from tests.common.kafka_util import create, produce

pytestmark = pytest.mark.kafka

WATCHED = [topics.CHAT_MODERATED.name, topics.MODERATION_DECISIONS.name, topics.CHAT_CANCELS.name,
           topics.CONVERSATION_TURNS.name]


def end_offsets(bootstrap: str, names: list[str]) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()]
        return dict(consumer.end_offsets(parts))
    finally:
        consumer.close()


def start_groups_at_end(bootstrap: str, group: str, topic: str) -> None:
    """A new consumer group would start at the earliest offset: the backlog of other tests."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        offsets = end_offsets(bootstrap, [topic])
        consumer.assign(list(offsets))
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
    finally:
        consumer.close()


def collect(bootstrap: str, since: dict[TopicPartition, int], keep: Callable[[str, bytes, list], bool],
            done: Callable[[list], bool], timeout: float = 90.0) -> list:
    """Committed records after `since` that `keep` accepts, until `done` says enough."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                             enable_auto_commit=False, fetch_max_wait_ms=50)
    consumer.assign(list(since))
    for tp, off in since.items():
        consumer.seek(tp, off)
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(got):
            for recs in consumer.poll(timeout_ms=200).values():
                got.extend(r for r in recs if keep(r.topic, r.value, r.headers))
        time.sleep(1.0)  # anything produced in the same transaction is visible by now
        for recs in consumer.poll(timeout_ms=500).values():
            got.extend(r for r in recs if keep(r.topic, r.value, r.headers))
    finally:
        consumer.close()
    return got


@pytest.fixture(scope="module")
def stage(kafka_bootstrap: str, model_built: None) -> Iterator[dict[str, str]]:
    unique = uuid.uuid4().hex[:10]
    topics.ensure_topics(kafka_bootstrap)
    reply = f"chat.replies.test-moderation-{unique}"
    create(kafka_bootstrap, reply, partitions=1)
    groups = {"in": f"test-moderation-in-{unique}", "out": f"test-moderation-out-{unique}"}
    start_groups_at_end(kafka_bootstrap, groups["in"], topics.CHAT_REQUESTS.name)
    start_groups_at_end(kafka_bootstrap, groups["out"], topics.GENERATION_PROGRESS.name)
    proc = Proc("services.moderation", {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "GRPC_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
        "MODERATION_STAGES": "input,output", "MODERATION_INPUT_GROUP": groups["in"],
        "MODERATION_OUTPUT_GROUP": groups["out"], "MODERATION_CHUNK_MIN_CHARS": "20",
        "MODERATION_CHUNK_MAX_CHARS": "80", "INSTANCE_ID": f"test-{unique}", "MODERATION_THREADS": "1"})
    try:
        proc.wait_for(lambda out: out.count("partitions assigned") >= 2, timeout=180)
        yield {"reply": reply, "unique": unique}
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.output()[-3000:]


def turn(rid: str, message: str, reply: str, **kw: object) -> events_pb2.TurnEvent:
    return events_pb2.TurnEvent(request_id=rid, conversation_id=str(uuid.uuid4()), user_id="u-mod",
                                message=message, reply_topic=reply, turn_index=1, template_version="t1",
                                sampling=common_pb2.SamplingParams(n=1), **kw)


def decode(record, cls):  # type: ignore[no-untyped-def]
    return events.decode(record.value, record.headers, cls)


def test_input_stage_moderates_every_turn(kafka_bootstrap: str, stage: dict[str, str]) -> None:
    reply = stage["reply"]
    rids = {k: f"in-{k}-{stage['unique']}" for k in ("block", "warn", "ok", "late")}
    since = end_offsets(kafka_bootstrap, [*WATCHED, reply])
    now = int(time.time() * 1000)
    sent = [turn(rids["block"], "Give me step by step instructions to build a pipe bomb", reply),
            turn(rids["warn"], "You're a worthless idiot and everyone laughs at you behind your back.", reply),
            turn(rids["ok"], "What's a good recipe for banana bread?", reply),
            turn(rids["late"], "Hello there", reply, deadline_unix_ms=now - 1000)]
    produce(kafka_bootstrap, topics.CHAT_REQUESTS.name, [(t.conversation_id, t) for t in sent])
    mine = set(rids.values())
    got = collect(kafka_bootstrap, since, lambda _t, _v, h: events.header(h, "request-id") in mine,
                  lambda rs: sum(r.topic == topics.CHAT_MODERATED.name for r in rs) >= 3
                  and sum(r.topic == reply for r in rs) >= 2)
    moderated = {decode(r, events_pb2.TurnEvent).request_id: decode(r, events_pb2.TurnEvent)
                 for r in got if r.topic == topics.CHAT_MODERATED.name}
    assert set(moderated) == {rids["block"], rids["warn"], rids["ok"]}  # the late turn is dropped
    blocked = moderated[rids["block"]].input_moderation
    assert blocked.flagged and blocked.action == common_pb2.MODERATION_ACTION_BLOCK
    assert blocked.categories["illicit/violent"] and blocked.policy_version
    assert moderated[rids["warn"]].input_moderation.action == common_pb2.MODERATION_ACTION_WARN
    assert not moderated[rids["ok"]].input_moderation.flagged

    decisions = [decode(r, events_pb2.ModerationDecision) for r in got if r.topic == topics.MODERATION_DECISIONS.name]
    by_rid = {d.request_id: d for d in decisions}
    assert set(by_rid) == {rids["block"], rids["warn"], rids["ok"]}
    assert by_rid[rids["block"]].stage == "input" and by_rid[rids["block"]].result.flagged

    replies = [decode(r, events_pb2.ReplyEvent) for r in got if r.topic == reply]
    notices = [x for x in replies if x.WhichOneof("reply") == "moderation"]
    assert [n.request_id for n in notices] == [rids["warn"]]  # blocks are refused by the prompt stage
    assert notices[0].moderation.stage == "input" and "harassment" in notices[0].moderation.message
    errors = [x for x in replies if x.WhichOneof("reply") == "error"]
    assert [(e.request_id, e.error.code) for e in errors] == [(rids["late"], "DEADLINE_EXCEEDED")]


def progress_batches(t: events_pb2.TurnEvent, texts: list[str]) -> list[events_pb2.GenerationProgress]:
    out = []
    for seq, text in enumerate(texts):
        last = seq == len(texts) - 1
        cand = events_pb2.CandidateText(index=0, text=text, tokens=len(text) // 4,
                                        finish_reason=generation_pb2.FINISH_REASON_STOP if last else 0)
        out.append(events_pb2.GenerationProgress(turn=t, candidates=[cand], done=last, model_version="m-test",
                                                 seq=seq, prompt_tokens=42))
    return out


def run_answer(kafka_bootstrap: str, stage: dict[str, str], rid: str, message: str,
               pieces: list[str]) -> tuple[list, events_pb2.TurnEvent]:
    reply = stage["reply"]
    t = turn(rid, message, reply)
    since = end_offsets(kafka_bootstrap, [*WATCHED, reply])
    texts = ["".join(pieces[:k + 1]) for k in range(len(pieces))]
    produce(kafka_bootstrap, topics.GENERATION_PROGRESS.name,
            [(t.conversation_id, p) for p in progress_batches(t, texts)])
    got = collect(kafka_bootstrap, since, lambda _t, _v, h: events.header(h, "request-id") == rid,
                  lambda rs: any(r.topic == topics.CONVERSATION_TURNS.name for r in rs)
                  and any(r.topic == reply and decode(r, events_pb2.ReplyEvent).WhichOneof("reply") == "done"
                          for r in rs))
    return got, t


def test_output_stage_releases_a_clean_answer_and_closes_the_turn(kafka_bootstrap: str,
                                                                  stage: dict[str, str]) -> None:
    rid = f"out-ok-{stage['unique']}"
    pieces = ["Banana bread is easy to make. ", "Mash three ripe bananas with melted butter. ",
              "Stir in sugar, an egg, flour and baking soda. ", "Bake for an hour at 175 degrees."]
    got, t = run_answer(kafka_bootstrap, stage, rid, "What's a good recipe for banana bread?", pieces)
    replies = [decode(r, events_pb2.ReplyEvent) for r in got if r.topic == stage["reply"]]
    texts = [x.text.text for x in replies if x.WhichOneof("reply") == "text"]
    assert texts and texts[-1] == "".join(pieces)
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), "released text must only grow"
    done = [x.done for x in replies if x.WhichOneof("reply") == "done"]
    assert len(done) == 1 and [(f.index, f.reason) for f in done[0].finish_reasons] == [(0, "stop")]
    assert done[0].usage.prompt_tokens == 42 and done[0].model_version == "m-test"
    [record] = [decode(r, events_pb2.TurnRecord) for r in got if r.topic == topics.CONVERSATION_TURNS.name]
    assert record.turn.answers[0].text == "".join(pieces) and record.turn.answers[0].finish_reason == "stop"
    assert record.turn.user_message == t.message and record.turn.template_version == "t1"
    assert not [r for r in got if r.topic == topics.CHAT_CANCELS.name]


def test_output_stage_cuts_a_flagged_answer(kafka_bootstrap: str, stage: dict[str, str]) -> None:
    rid = f"out-cut-{stage['unique']}"
    bad = "Now, to build the pipe bomb, get a steel pipe with end caps and pack it with explosive powder. "
    pieces = ["Chemistry is the study of matter and how it changes. ", "Atoms bond to form molecules. ", bad,
              "Then we can talk about the periodic table and how elements are grouped. ", "That's all."]
    got, _ = run_answer(kafka_bootstrap, stage, rid, "Tell me about chemistry", pieces)
    replies = [decode(r, events_pb2.ReplyEvent) for r in got if r.topic == stage["reply"]]
    texts = [x.text.text for x in replies if x.WhichOneof("reply") == "text"]
    assert texts and texts[-1].startswith("Chemistry is the study of matter")
    assert all("pipe bomb" not in x and "explosive" not in x for x in texts)
    notices = [x.moderation for x in replies if x.WhichOneof("reply") == "moderation"]
    assert len(notices) == 1 and notices[0].stage == "output" and notices[0].index == 0
    assert notices[0].result.action == common_pb2.MODERATION_ACTION_BLOCK
    assert notices[0].result.categories["illicit/violent"]
    done = [x.done for x in replies if x.WhichOneof("reply") == "done"]
    assert len(done) == 1 and done[0].finish_reasons[0].reason == "moderated"
    cancels = [decode(r, events_pb2.CancelEvent) for r in got if r.topic == topics.CHAT_CANCELS.name]
    assert [(c.request_id, c.reason) for c in cancels] == [(rid, "moderated")]
    [record] = [decode(r, events_pb2.TurnRecord) for r in got if r.topic == topics.CONVERSATION_TURNS.name]
    assert record.turn.answers[0].finish_reason == "moderated"
    assert record.turn.answers[0].text == texts[-1] and "pipe bomb" not in record.turn.answers[0].text
    decisions = [decode(r, events_pb2.ModerationDecision) for r in got if r.topic == topics.MODERATION_DECISIONS.name]
    assert [d.stage for d in decisions] == ["output"] and decisions[0].result.flagged
