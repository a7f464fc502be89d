"""Only keys marked as labelers may label feedback `simulated` (real gateway process, real Kafka).

The turn judged is written to the history topic by the test (as output moderation would), so no
model is needed. Nothing is accepted here: feedback left on the shared chat.feedback topic while
no sink runs would land in the next test stack's dataset. That a labeler key's simulated rankings
are accepted and stored as simulated is tests/rlhf/test_labelers.py (it uses colloquy-dev-key).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.common import kafka_loop, turns
from services.common.auth import KeyRing
from services.common.config import KafkaConfig
from tests.gateway.process import Gateway, running_gateway

ROOT = Path(__file__).resolve().parents[2]
SIMULATED = ("x-colloquy-feedback-source", "simulated")


def key_entry(user: str, key: str, labeler: bool = False) -> str:
    return (f"  - user: {user}\n    sha256: {hashlib.sha256(key.encode()).hexdigest()}\n"
            + ("    labeler: true\n" if labeler else ""))


@pytest.fixture(scope="module")
def gateway(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory,
            conversation_store: str) -> Iterator[Gateway]:
    keys = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    keys.write_text("keys:\n" + key_entry("person", "person-key") + key_entry("robot", "robot-key", True))
    with running_gateway(kafka_bootstrap, {"API_KEYS_FILE": str(keys)}) as gw:
        yield gw


def recorded_turn(bootstrap: str, user: str) -> str:
    """A conversation of `user` with one finished turn of two answers, in the history topic."""
    conv = str(uuid.uuid4())
    record = events_pb2.TurnRecord(conversation_id=conv, user_id=user, prompt="Q", turn=chat_pb2.Turn(
        index=1, user_message="Q", request_id=uuid.uuid4().hex,
        answers=[chat_pb2.Answer(index=i, text=f"answer {i}", finish_reason="stop") for i in range(2)]))
    out = turns.turn_record_event(record)
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=bootstrap), "test-history")
    producer.send(out.topic, key=out.key.encode(), value=record.SerializeToString(), headers=out.headers(),
                  partition=out.partition)
    producer.flush()
    producer.close()
    return conv


def feedback(conv: str) -> chat_pb2.SubmitFeedbackRequest:
    return chat_pb2.SubmitFeedbackRequest(conversation_id=conv, turn_index=1,
                                          ranking=chat_pb2.Ranking(order=[1, 0]))


@pytest.mark.kafka
def test_simulated_source_is_refused_for_a_key_that_is_not_a_labeler(gateway: Gateway,
                                                                      kafka_bootstrap: str) -> None:
    conv = recorded_turn(kafka_bootstrap, "person")
    with grpc.insecure_channel(gateway.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitFeedback(feedback(conv), metadata=[("authorization", "Bearer person-key"), SIMULATED],
                                timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "labeler" in (refused.value.details() or "")


def test_the_simulated_labelers_default_key_is_a_labeler_in_the_dev_key_file() -> None:
    """`make rlhf-label` (rlhf/labelers.py) sends its feedback with colloquy-dev-key."""
    keys = KeyRing(str(ROOT / "deploy" / "dev" / "api-keys.yaml"))
    who = keys.identity("colloquy-dev-key")
    assert who is not None and who.labeler
    alice = keys.identity("colloquy-dev-key-alice")
    assert alice is not None and not alice.labeler
