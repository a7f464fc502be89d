"""The prompt stage as a real process on the real broker: history in, prompts and replies out."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from colloquy.v1 import events_pb2

from services.common import topics
from services.prompt.templates import TemplateSet
from services.tokenizer.domain import TextTokenizer
from tests.prompt.kafka_helpers import PromptStage, collect, record, turn_event, write_records

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]


@pytest.fixture(scope="module")
def stage(kafka_bootstrap: str, tokenizer_path: Path) -> Iterator[PromptStage]:
    s = PromptStage(kafka_bootstrap, uuid.uuid4().hex[:10], tokenizer_path).start()
    try:
        yield s
    finally:
        assert s.proc is not None
        s.proc.signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0


def conv() -> str:
    return str(uuid.uuid4())


def history_of(bootstrap: str, conversation_id: str, expect: int) -> list[events_pb2.TurnRecord]:
    return collect(bootstrap, topics.CONVERSATION_TURNS.name, events_pb2.TurnRecord,
                   lambda r: r.conversation_id == conversation_id, expect)


def test_the_prompt_carries_the_whole_conversation_and_survives_a_restart(
        kafka_bootstrap: str, unique: str, tokenizer_path: Path, tok: TextTokenizer,
        shipped: TemplateSet) -> None:
    """Structural memory: turn 3's prompt holds turn 1's fact; after SIGKILL, turn 4 still does."""
    c = conv()
    write_records(kafka_bootstrap, [
        record(c, "alice", 1, "Hi! My dog is called Biscuit.", "What a lovely name for a dog!"),
        record(c, "alice", 2, "I live in Lisbon.", "Lisbon is a beautiful city."),
    ])
    stage = PromptStage(kafka_bootstrap, unique, tokenizer_path).start()
    assert stage.proc is not None
    try:
        stage.send(turn_event(c, "alice", "r3", "What is my dog's name?", stage.replies))
        [out] = stage.prompts("r3")
        [started] = stage.replies_for("r3", 1, settle=0.2)
    finally:
        stage.proc.kill()  # SIGKILL: no goodbye, no flush; only what Kafka holds survives

    v1 = shipped.get()  # the served version
    assert out.turn_index == 3
    assert "My dog is called Biscuit." in out.prompt and "Lisbon is a beautiful city." in out.prompt
    if v1.after_in_history:  # earlier messages as they were sent when newest: a stable prefix
        assert f"My dog is called Biscuit.\n\n{v1.after}<|im_end|>" in out.prompt
    assert out.prompt.startswith(f"<|im_start|>system\n{v1.before}<|im_end|>\n")
    assert out.prompt.endswith(f"What is my dog's name?\n\n{v1.after}<|im_end|>\n<|im_start|>assistant\n")
    assert out.template_version == shipped.current and out.dropped_turns == 0
    assert out.prompt_tokens == tok.count(out.prompt)
    assert out.message == "What is my dog's name?", "the turn keeps the user's message as sent"
    assert started.started.turn_index == 3 and started.started.conversation_id == c

    # Output moderation records turn 3; a fresh process must see it all, from Kafka alone.
    write_records(kafka_bootstrap, [record(c, "alice", 3, "What is my dog's name?",
                                           "Your dog is called Biscuit.", request_id="r3")])
    stage.start()
    try:
        stage.send(turn_event(c, "alice", "r4", "And where do I live?", stage.replies))
        [out4] = stage.prompts("r4")
    finally:
        stage.proc.signal(signal.SIGTERM)
        assert stage.proc.wait(30) == 0
    assert out4.turn_index == 4
    assert "Biscuit" in out4.prompt and "Lisbon" in out4.prompt and "Your dog is called Biscuit." in out4.prompt
    assert len(stage.prompts_now("r3")) == 1, "turn 3 was committed once and never redone"
    for rec in history_of(kafka_bootstrap, c, 3):
        assert v1.before not in rec.turn.user_message and v1.after not in rec.turn.user_message


def test_blocked_message_is_recorded_with_a_refusal_and_never_prompted(
        stage: PromptStage, kafka_bootstrap: str, shipped: TemplateSet) -> None:
    c = conv()
    v1 = shipped.get()  # the served version
    stage.send(turn_event(c, "bob", "rb", "something the policy refuses", stage.replies, blocked=True),
               turn_event(c, "bob", "rn", "Then tell me a joke.", stage.replies))
    [nxt] = stage.prompts("rn")
    replies = stage.replies_for("rb", 3)
    [rec] = history_of(kafka_bootstrap, c, 1)

    assert [r.WhichOneof("reply") for r in replies] == ["started", "moderation", "done"]
    started, notice, done = replies
    assert started.started.turn_index == 1
    assert notice.moderation.stage == "input" and notice.moderation.message == v1.refusal
    assert notice.moderation.result.action == 3  # MODERATION_ACTION_BLOCK, passed through
    assert [(f.index, f.reason) for f in done.done.finish_reasons] == [(0, "blocked")]
    assert done.done.template_version == shipped.current

    assert rec.user_id == "bob" and rec.turn.index == 1 and rec.turn.blocked
    assert rec.turn.user_message == "something the policy refuses" and rec.turn.request_id == "rb"
    assert [(a.text, a.finish_reason) for a in rec.turn.answers] == [(v1.refusal, "blocked")]
    assert not rec.prompt, "a blocked message never had a prompt"

    assert nxt.turn_index == 2, "the blocked turn took index 1"
    assert "policy refuses" not in nxt.prompt and v1.refusal not in nxt.prompt
    assert stage.prompts_now("rb") == []


def test_one_turn_at_a_time_and_redelivery_keeps_the_index(stage: PromptStage) -> None:
    c = conv()
    first = turn_event(c, "carol", "ra", "First question", stage.replies)
    stage.send(first, first, turn_event(c, "carol", "rz", "Impatient second question", stage.replies))
    outs = stage.prompts("ra", expect=2)
    [err] = stage.replies_for("rz", 1)
    assert [o.turn_index for o in outs] == [1, 1], "a redelivered request gets the same turn index"
    assert err.error.code == "ABORTED" and err.error.stage == "prompt"
    assert err.error.message == "a turn is already being answered in this conversation"
    assert stage.prompts_now("rz") == []


def test_a_turn_generation_gave_up_on_frees_the_conversation_for_a_retry(stage: PromptStage) -> None:
    """chat.unanswered: a retry right after generation refused the turn is accepted (today it was
    refused ABORTED until the turn expired, two minutes later) and takes the unrecorded index."""
    c = conv()
    failed = turn_event(c, "erin", "ru1", "First try", stage.replies)
    stage.send(failed)
    [out] = stage.prompts("ru1")
    stage.unanswered(failed)
    deadline = time.monotonic() + 30
    while True:  # the notice and the retry travel on different topics: allow for its consumer
        rid = f"ru-retry-{uuid.uuid4().hex[:6]}"
        stage.send(turn_event(c, "erin", rid, "Second try", stage.replies))
        [reply] = stage.replies_for(rid, 1, settle=0.2)
        if reply.WhichOneof("reply") == "started" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reply.WhichOneof("reply") == "started", reply
    [retry] = stage.prompts(rid, settle=0.2)
    assert out.turn_index == retry.turn_index == 1


def test_someone_elses_conversation_is_not_found(stage: PromptStage, kafka_bootstrap: str) -> None:
    c = conv()
    write_records(kafka_bootstrap, [record(c, "alice", 1, "My secret is 42.", "Noted.")])
    stage.send(turn_event(c, "mallory", "rm", "What is the secret?", stage.replies))
    [err] = stage.replies_for("rm", 1)
    assert (err.error.code, err.error.message) == ("NOT_FOUND", "conversation not found")
    assert stage.prompts_now("rm") == []


@pytest.mark.parametrize(("kwargs", "code", "message"), [
    ({"deadline_ms": 1}, "DEADLINE_EXCEEDED", "the request's deadline passed before the prompt stage"),
    # The served context is generation's slot (GENERATION_SLOT_TOKENS, 2048), not the model's 8192.
    ({"max_tokens": 2048}, "INVALID_ARGUMENT",
     "sampling.max_tokens: must be less than the model's context (2048 tokens)"),
    ({"max_tokens": 1900, "message": "word " * 400}, "INVALID_ARGUMENT",
     "message: too long for the model's context ("),
])
def test_turns_that_cannot_be_prompted_fail_at_the_gateway(stage: PromptStage, kwargs: dict, code: str,
                                                          message: str) -> None:
    rid = f"rf-{uuid.uuid4().hex[:6]}"
    text = kwargs.pop("message", "Hello")
    stage.send(turn_event(conv(), "dave", rid, text, stage.replies, **kwargs))
    [err] = stage.replies_for(rid, 1)
    assert err.error.code == code and err.error.message.startswith(message), err.error
    assert stage.prompts_now(rid) == []


def test_stage_metrics(stage: PromptStage) -> None:
    stage.send(turn_event(conv(), "frank", "rmx", "Count me", stage.replies))
    stage.prompts("rmx", settle=0.2)
    assert stage.proc is not None
    serving = next(line for line in stage.proc.output().splitlines() if '"msg": "serving"' in line)
    port = json.loads(serving)["metrics_port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'colloquy_prompt_turns_total{outcome="assembled"}' in body
    assert "colloquy_prompt_tokens_bucket" in body
    assert "colloquy_prompt_pending_turns" in body
    assert f'colloquy_events_consumed_total{{stage="prompt",topic="{stage.topic_in}"}}' in body
