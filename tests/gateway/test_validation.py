"""Gateway input validation and API keys: unit tests of pure functions."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest
from colloquy.v1 import chat_pb2, common_pb2

from services.common import config
from services.common.auth import KeyRing, key_from_metadata
from services.gateway import validation
from services.gateway.config import GatewayConfig

CFG = config.load(GatewayConfig, {})


def req(**kw: object) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(**{"message": "hello", **kw})


def test_defaults_filled_in_model_dependent_ones_left_to_the_model() -> None:
    conv, text, s = validation.chat_request(req(), CFG)
    assert (conv, text) == ("", "hello")
    assert (s.max_tokens, s.n) == (256, 1)
    for field in ("seed", "temperature", "top_p", "top_k", "repetition_penalty", "copy_penalty"):
        assert not s.HasField(field), field


def test_explicit_sampling_values_pass_through() -> None:
    sampling = common_pb2.SamplingParams(temperature=0.0, top_p=0.5, top_k=7, repetition_penalty=1.3,
                                         copy_penalty=0.0)
    _, _, s = validation.chat_request(req(sampling=sampling), CFG)
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 0.5, 7)
    assert s.repetition_penalty == pytest.approx(1.3)
    assert s.HasField("copy_penalty") and s.copy_penalty == 0.0  # 0 turns the copy guard off


@pytest.mark.parametrize(("kw", "field"), [
    ({"message": ""}, "message"),
    ({"message": " \n\t "}, "message"),
    ({"message": "x" * 8193}, "message"),
    ({"message": "a\x00b"}, "message"),
    ({"conversation_id": "not-a-uuid"}, "conversation_id"),
    ({"sampling": common_pb2.SamplingParams(temperature=-0.1)}, "sampling.temperature"),
    ({"sampling": common_pb2.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
    ({"sampling": common_pb2.SamplingParams(top_p=0)}, "sampling.top_p"),
    ({"sampling": common_pb2.SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
    ({"sampling": common_pb2.SamplingParams(max_tokens=100000)}, "sampling.max_tokens"),
    ({"sampling": common_pb2.SamplingParams(n=0)}, "sampling.n"),
    ({"sampling": common_pb2.SamplingParams(n=5)}, "sampling.n"),
    ({"sampling": common_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"])}, "sampling.stop"),
    ({"sampling": common_pb2.SamplingParams(stop=[""])}, "sampling.stop[0]"),
    ({"sampling": common_pb2.SamplingParams(stop=["a\x00"])}, "sampling.stop[0]"),
    ({"sampling": common_pb2.SamplingParams(repetition_penalty=0.9)}, "sampling.repetition_penalty"),
    ({"sampling": common_pb2.SamplingParams(repetition_penalty=float("inf"))},
     "sampling.repetition_penalty"),
    ({"sampling": common_pb2.SamplingParams(top_k=1001)}, "sampling.top_k"),
    ({"sampling": common_pb2.SamplingParams(copy_penalty=-0.1)}, "sampling.copy_penalty"),
    ({"sampling": common_pb2.SamplingParams(copy_penalty=5.5)}, "sampling.copy_penalty"),
    ({"sampling": common_pb2.SamplingParams(copy_penalty=float("nan"))}, "sampling.copy_penalty"),
    ({"client_request_id": "x" * 65}, "client_request_id"),
])
def test_bad_input_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(validation.InvalidArgument) as exc:
        validation.chat_request(req(**kw), CFG)
    assert str(exc.value).startswith(field + ":")


def test_multibyte_size_counts_bytes() -> None:
    with pytest.raises(validation.InvalidArgument, match="bytes"):
        validation.message("é" * 5000, 8192)  # 10000 bytes


def test_uuid_canonical() -> None:
    u = uuid.uuid4()
    assert validation.conversation_id(str(u)) == str(u)
    with pytest.raises(validation.InvalidArgument):
        validation.conversation_id(u.hex)


def turn(n: int, blocked: bool = False) -> chat_pb2.Turn:
    return chat_pb2.Turn(index=1, blocked=blocked, answers=[chat_pb2.Answer(index=i) for i in range(n)])


def test_feedback_checks() -> None:
    ok = chat_pb2.SubmitFeedbackRequest(turn_index=1, ranking=chat_pb2.Ranking(order=[2, 0, 1]))
    validation.feedback(ok, turn(3))
    tied = chat_pb2.SubmitFeedbackRequest(turn_index=1, ranking=chat_pb2.Ranking(order=[2, 0, 1],
                                                                                  tied_with_next=[True, False]))
    validation.feedback(tied, turn(3))
    bad = [
        (chat_pb2.SubmitFeedbackRequest(turn_index=1, ranking=chat_pb2.Ranking(order=[2, 0, 1], tied_with_next=[True])),
         turn(3), "ranking.tied_with_next"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=1, ranking=chat_pb2.Ranking(order=[0, 0, 1])), turn(3),
         "ranking.order"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=1, ranking=chat_pb2.Ranking(order=[0, 1])), turn(3),
         "ranking.order"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=1, rating=chat_pb2.Rating(answer_index=3)), turn(3),
         "rating.answer_index"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=1), turn(1), "feedback"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=0, rating=chat_pb2.Rating()), turn(1), "turn_index"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=4, rating=chat_pb2.Rating()), None, "turn_index"),
        (chat_pb2.SubmitFeedbackRequest(turn_index=1, rating=chat_pb2.Rating()), turn(1, True), "turn_index"),
    ]
    for request, t, field in bad:
        with pytest.raises(validation.InvalidArgument) as exc:
            validation.feedback(request, t)
        assert str(exc.value).startswith(field), (request, str(exc.value))


def test_keyring_hashed_lookup_and_rotation(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - user: ann\n    sha256: {hashlib.sha256(b'k1').hexdigest()}\n")
    ring = KeyRing(str(f))
    assert ring.user_for("k1") == "ann"
    assert ring.user_for("k2") is None
    assert ring.user_for("") is None
    # Rotate: replace k1 by k2 without a restart.
    f.write_text(f"keys:\n  - user: ann\n    sha256: {hashlib.sha256(b'k2').hexdigest()}\n")
    later = time.time() + 5
    os.utime(f, (later, later))
    assert ring.user_for("k2") == "ann"
    assert ring.user_for("k1") is None


def test_key_from_metadata() -> None:
    assert key_from_metadata([("authorization", "Bearer abc ")]) == "abc"
    assert key_from_metadata([("authorization", "abc")]) == "abc"
    assert key_from_metadata([("x", "y")]) == ""


def seed(system: str = "", *exchanges: tuple[str, str]) -> chat_pb2.ConversationSeed:
    return chat_pb2.ConversationSeed(system=system, exchanges=[chat_pb2.SeedExchange(user=u, assistant=a)
                                                               for u, a in exchanges])


def test_a_seed_starts_a_new_conversation_only() -> None:
    validation.chat_request(req(seed=seed("Be brief.", ("My cat is Pixel.", "Nice!"), ("Hi", ""))), CFG)
    with pytest.raises(validation.InvalidArgument, match=r"^seed: only a new conversation"):
        validation.chat_request(req(conversation_id=str(uuid.uuid4()), seed=seed("Be brief.")), CFG)


@pytest.mark.parametrize(("s", "field"), [
    (seed("", ("  ", "x")), "seed.exchanges[0].user"),
    (seed("", ("a", "b"), ("c", "d\x00")), "seed.exchanges[1].assistant"),
    (seed("x" * 9000), "seed.system"),
    (seed("", *[("q", "a")] * 33), "seed.exchanges"),
    (seed("", *[("q" * 4000, "a" * 4000)] * 5), "seed"),
])
def test_a_bad_seed_names_its_field(s: chat_pb2.ConversationSeed, field: str) -> None:
    with pytest.raises(validation.InvalidArgument) as exc:
        validation.chat_request(req(seed=s), CFG)
    assert str(exc.value).startswith(f"{field}: ")


def test_the_receive_limit_fits_the_largest_seed() -> None:
    biggest = req(message="m" * CFG.max_message_bytes, client_request_id="k" * 64, seed=chat_pb2.ConversationSeed(
        exchanges=[chat_pb2.SeedExchange(user="u" * 512, assistant="a" * 512)] * CFG.max_seed_exchanges))
    validation.chat_request(biggest, CFG)
    assert biggest.ByteSize() < CFG.max_request_bytes < 65536
