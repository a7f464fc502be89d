"""PromptService.AssemblePrompt over real gRPC, reading the real history topic."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc

from devtools.procs import Proc, free_port
from services.common import topics
from services.prompt.templates import TemplateSet
from services.tokenizer.domain import TextTokenizer
from tests.prompt.kafka_helpers import record, write_records

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]

CONTEXT = 1024


@pytest.fixture(scope="module")
def stub(kafka_bootstrap: str, tokenizer_path: Path) -> Iterator[prompt_pb2_grpc.PromptServiceStub]:
    topics.ensure_topics(kafka_bootstrap, [topics.CONVERSATION_TURNS])
    port = free_port()
    proc = Proc("services.prompt", {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "GRPC_PORT": str(port), "METRICS_PORT": "0",
        "KAFKA_WORKER": "false", "TOKENIZER_PATH": str(tokenizer_path), "MODEL_CONTEXT_TOKENS": str(CONTEXT)})
    proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=90)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield prompt_pb2_grpc.PromptServiceStub(channel)
    finally:
        channel.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def assemble(stub: prompt_pb2_grpc.PromptServiceStub, **kw: object) -> prompt_pb2.AssemblePromptResponse:
    return stub.AssemblePrompt(prompt_pb2.AssemblePromptRequest(**kw), timeout=30)


def test_new_conversation(stub: prompt_pb2_grpc.PromptServiceStub, tok: TextTokenizer,
                          shipped: TemplateSet) -> None:
    v1 = shipped.get()  # the served version
    resp = assemble(stub, message="Hello there!")
    assert resp.turn_index == 1 and resp.dropped_turns == 0 and resp.template_version == shipped.current
    assert list(resp.answer_stops) == list(v1.answer_stops) != []
    assert [(m.role, m.content) for m in resp.messages] == [
        (common_pb2.ROLE_SYSTEM, v1.before), (common_pb2.ROLE_USER, f"Hello there!\n\n{v1.after}")]
    assert resp.prompt.endswith("<|im_start|>assistant\n")
    assert resp.prompt_tokens == tok.count(resp.prompt)

    v2 = assemble(stub, message="Hello there!", template_version="v2")
    assert v2.template_version == "v2" and shipped.get("v2").before in v2.prompt


def test_history_is_the_owners_only(stub: prompt_pb2_grpc.PromptServiceStub, kafka_bootstrap: str) -> None:
    c = str(uuid.uuid4())
    write_records(kafka_bootstrap, [record(c, "alice", 1, "My dog is called Biscuit.", "Lovely name!"),
                                    record(c, "alice", 2, "He likes balls.", "Many dogs do.")])
    resp = assemble(stub, conversation_id=c, user_id="alice", message="What is my dog's name?")
    assert resp.turn_index == 3
    assert "Biscuit" in resp.prompt and "Many dogs do." in resp.prompt
    assert [m.role for m in resp.messages] == [1, 2, 3, 2, 3, 2]
    again = assemble(stub, conversation_id=c, user_id="alice", message="Again?")
    assert again.turn_index == 3, "direct assembly claims no turn"

    for user in ("mallory", ""):
        with pytest.raises(grpc.RpcError) as exc:
            assemble(stub, conversation_id=c, user_id=user, message="What is the dog's name?")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert exc.value.details() == "conversation not found"


def test_long_history_is_cut_to_the_budget(stub: prompt_pb2_grpc.PromptServiceStub, kafka_bootstrap: str,
                                           tok: TextTokenizer) -> None:
    c = str(uuid.uuid4())
    write_records(kafka_bootstrap, [
        record(c, "erin", i, f"Turn {i}: " + "tell me more about the weather " * 5, f"Answer {i}: " + "sunny " * 20)
        for i in range(1, 21)])
    resp = assemble(stub, conversation_id=c, user_id="erin", message="Summarise.", answer_budget=200)
    assert resp.turn_index == 21
    assert 0 < resp.dropped_turns < 20
    assert resp.prompt_tokens == tok.count(resp.prompt) <= CONTEXT - 200
    assert "Turn 20:" in resp.prompt and "Turn 1:" not in resp.prompt
    assert f"Turn {resp.dropped_turns + 1}:" in resp.prompt and f"Turn {resp.dropped_turns}:" not in resp.prompt


@pytest.mark.parametrize(("kw", "message"), [
    ({"message": ""}, "message: must not be empty"),
    ({"message": " \n\t "}, "message: must not be empty"),
    ({"message": "a" * 8193}, "message: longer than 8192 bytes"),
    ({"message": "hi", "conversation_id": "not-a-uuid"}, "conversation_id: must be a UUID"),
    ({"message": "hi", "template_version": "v9"}, "template_version: unknown version 'v9' (known: v1, v2, v3, v4, v5)"),
    ({"message": "hi", "answer_budget": 0}, "answer_budget: must be at least 1"),
    ({"message": "hi", "answer_budget": CONTEXT},
     f"answer_budget: must be less than the model's context ({CONTEXT} tokens)"),
    ({"message": " ".join(["word"] * 1000)}, "message: too long for the model's context (1000 tokens, at most "),
])
def test_invalid_argument_names_the_field(stub: prompt_pb2_grpc.PromptServiceStub, kw: dict,
                                          message: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        assemble(stub, **kw)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(message), exc.value.details()


def test_bad_templates_file_stops_startup(tmp_path: Path, tokenizer_path: Path) -> None:
    bad = tmp_path / "templates.yaml"
    bad.write_text("current: v3\nversions:\n  v1:\n    before: hi\n")
    proc = Proc("services.prompt", {"GRPC_PORT": "0", "KAFKA_WORKER": "false",
                                    "TOKENIZER_PATH": str(tokenizer_path), "PROMPT_TEMPLATES_FILE": str(bad)})
    assert proc.wait(60) == 2
    assert "'current' must name one of the versions (v1)" in proc.output()
