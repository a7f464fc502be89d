"""The chat pipeline end to end: real Kafka, every service as its own process, Ray Serve and the
served ONNX model. One stack for the module (starting Ray on 2 cores is slow)."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time
import uuid

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2, events_pb2, generation_pb2

from devtools.stack import Stack
from services.common import events, topics
from tests.common.kafka_util import Tail
from tests.pipeline.progress import final_progress

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

DEV = [("authorization", "Bearer colloquy-dev-key")]
ALICE = [("authorization", "Bearer colloquy-dev-key-alice")]
BOB = [("authorization", "Bearer colloquy-dev-key-bob")]
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def chat(stack: Stack):
    with grpc.insecure_channel(stack.gateway) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def run_chat(stub, message: str, conv: str = "", md=DEV, sampling=GREEDY, timeout: float = 120):
    """Returns (conversation id, turn index, answer text of candidate 0, all events)."""
    evs = list(stub.Chat(chat_pb2.ChatRequest(conversation_id=conv, message=message, sampling=sampling),
                         metadata=md, timeout=timeout))
    started = evs[0].started
    text = "".join(e.delta.text for e in evs if e.WhichOneof("event") == "delta" and e.delta.index == 0)
    return started.conversation_id, started.turn_index, text, evs


def test_chat_streams_an_answer_and_records_the_turn(chat) -> None:
    conv, idx, text, evs = run_chat(chat, "What is the capital of France?")
    kinds = [e.WhichOneof("event") for e in evs]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert idx == 1
    # The answer itself is asserted only where the build passes reliably (tests/model checks
    # "Paris" on the bare served build); through the pipeline, with hidden instructions around
    # the message, the 135M int4 model sometimes answers off-topic.
    assert text.strip()
    done = evs[-1].done
    assert done.model_version and done.template_version
    assert [r.reason for r in done.finish_reasons] in (["stop"], ["length"])
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    conv_view = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    [turn] = conv_view.turns
    assert turn.user_message == "What is the capital of France?"
    assert turn.answers[0].text == text
    assert turn.template_version == done.template_version
    # Hidden instructions never appear in the visible history.
    assert "<|im_start|>" not in str(conv_view) and "system" not in turn.user_message


def test_a_long_answer_streams_in_several_deltas(chat) -> None:
    _, _, text, evs = run_chat(chat, "Write a poem about the sea.",
                               sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=80))
    deltas = [e.delta.text for e in evs if e.WhichOneof("event") == "delta"]
    assert len(deltas) >= 2, "the answer must arrive in several deltas, not at once"
    assert "".join(deltas) == text and len(text) > 40


def test_turn_three_prompt_contains_a_fact_from_turn_one(chat, kafka_bootstrap: str) -> None:
    tail = Tail(kafka_bootstrap, topics.CHAT_PROMPTS.name)
    conv, _, _, _ = run_chat(chat, "Hi, I have a dog called Biscuit.")
    conv, _, _, _ = run_chat(chat, "What is 2 plus 2?", conv)
    conv, idx, _, _ = run_chat(chat, "What is my dog's name?", conv)
    assert idx == 3
    try:
        prompts = [events.decode(r.value, r.headers, events_pb2.TurnEvent) for r in tail.read()]
    finally:
        tail.close()
    mine = [p for p in prompts if p.conversation_id == conv]
    third = next(p for p in mine if p.turn_index == 3)
    assert "Biscuit" in third.prompt
    assert "What is 2 plus 2?" in third.prompt
    assert third.prompt.rstrip().endswith("<|im_start|>assistant")
    assert third.prompt.count("<|im_start|>system") >= 1  # hidden instructions


def test_blocked_message_never_reaches_generation(chat, kafka_bootstrap: str) -> None:
    tail = Tail(kafka_bootstrap, topics.CHAT_PROMPTS.name)
    conv, _idx, _text, evs = run_chat(chat, "Immigrants are subhuman parasites and I want to hurt them all.")
    kinds = [e.WhichOneof("event") for e in evs]
    assert "moderation" in kinds
    notice = next(e.moderation for e in evs if e.WhichOneof("event") == "moderation")
    assert notice.stage == "input" and notice.result.flagged
    assert [r.reason for r in evs[-1].done.finish_reasons] == ["blocked"]
    try:
        prompts = tail.read(settle=2.0)  # everything up to now, and 2 s for a late one
    finally:
        tail.close()
    assert not [r for r in prompts if r.key == conv.encode()], "a blocked message was sent to generation"
    view = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    assert view.turns[0].blocked


def test_eight_concurrent_chats_all_complete(chat) -> None:
    questions = [f"What is {i} plus {i}?" for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: run_chat(chat, q, sampling=common_pb2.SamplingParams(
            temperature=0.0, max_tokens=24)), questions))
    assert len({r[0] for r in results}) == 8
    for _, _, _text, evs in results:
        assert evs[-1].WhichOneof("event") == "done"
        # "moderated": output moderation cut an answer; the chat still completed with its notice.
        assert [r.reason for r in evs[-1].done.finish_reasons] in (["stop"], ["length"], ["moderated"])


def test_cancelled_chat_stops_generation(chat, kafka_bootstrap: str) -> None:
    progress = Tail(kafka_bootstrap, topics.GENERATION_PROGRESS.name)
    call = chat.Chat(chat_pb2.ChatRequest(
        message="Write a very long story about a dragon.",
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1000)), metadata=DEV, timeout=120)
    request_id = ""
    for ev in call:
        if ev.WhichOneof("event") == "started":
            request_id = ev.started.request_id
        if ev.WhichOneof("event") == "delta":
            break
    call.cancel()
    final = final_progress(progress, request_id)
    assert final is not None, "generation never finished the cancelled request"
    [cand] = final.candidates
    assert cand.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert cand.tokens < 500


@pytest.mark.parametrize(("kw", "field"), [
    ({"message": ""}, "message"),
    ({"message": "   \n"}, "message"),
    ({"message": "x" * 9000}, "message"),
    ({"message": "hi", "conversation_id": "12345"}, "conversation_id"),
    ({"message": "hi", "sampling": common_pb2.SamplingParams(n=9)}, "sampling.n"),
    ({"message": "hi", "sampling": common_pb2.SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
    ({"message": "hi", "sampling": common_pb2.SamplingParams(temperature=-1)}, "sampling.temperature"),
])
def test_bad_input_is_invalid_argument_naming_the_field(chat, kw: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        list(chat.Chat(chat_pb2.ChatRequest(**kw), metadata=DEV, timeout=10))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(field)


def test_a_request_bigger_than_any_valid_one_is_refused_before_the_key_check(chat) -> None:
    """The gateway's receive limit fits its largest valid request (a message of
    CHAT_MAX_MESSAGE_BYTES plus 8 KiB): a 64 KiB message is refused by gRPC itself, even with a
    wrong key, so nothing parses or authenticates it; one just over the message limit still gets
    the field-naming INVALID_ARGUMENT."""
    bad_key = [("authorization", "Bearer wrong-key")]
    with pytest.raises(grpc.RpcError) as exc:
        list(chat.Chat(chat_pb2.ChatRequest(message="x" * 65536), metadata=bad_key, timeout=10))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        list(chat.Chat(chat_pb2.ChatRequest(message="x" * 12000), metadata=DEV, timeout=10))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("message:")


def test_invalid_utf8_bytes_are_refused(stack: Stack) -> None:
    """A client that sends raw bytes that are not UTF-8 in a string field gets INVALID_ARGUMENT."""
    raw = b"\x12\x04\xff\xfe\xfd\xfc"  # field 2 (message), 4 bytes of invalid UTF-8
    with grpc.insecure_channel(stack.gateway) as ch:
        call = ch.unary_stream("/colloquy.v1.ChatService/Chat", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as exc:
            list(call(raw, metadata=DEV, timeout=10))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in exc.value.details()


def test_auth_and_ownership(chat) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        list(chat.Chat(chat_pb2.ChatRequest(message="hi"), timeout=10))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        list(chat.Chat(chat_pb2.ChatRequest(message="hi"), metadata=[("authorization", "Bearer nope")], timeout=10))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED

    conv, _, _, _ = run_chat(chat, "Hello, what is the capital of Italy?", md=ALICE)
    for call in (
        lambda: chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=BOB),
        lambda: list(chat.Chat(chat_pb2.ChatRequest(conversation_id=conv, message="hi"), metadata=BOB, timeout=10)),
        lambda: chat.SubmitFeedback(chat_pb2.SubmitFeedbackRequest(
            conversation_id=conv, turn_index=1, rating=chat_pb2.Rating(thumbs_up=True)), metadata=BOB),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    unknown = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as exc:
        chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=unknown), metadata=ALICE)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    # The owner can rate the answer.
    fid = chat.SubmitFeedback(chat_pb2.SubmitFeedbackRequest(
        conversation_id=conv, turn_index=1, rating=chat_pb2.Rating(thumbs_up=True)), metadata=ALICE).feedback_id
    assert fid


def test_per_user_rate_limit_says_when_to_retry(chat) -> None:
    """Bursts past the user's limit get RESOURCE_EXHAUSTED with a retry hint; other users are unaffected."""
    bob = [("authorization", "Bearer colloquy-dev-key-bob")]
    refused = None
    for _ in range(200):
        try:
            list(chat.Chat(chat_pb2.ChatRequest(message=""), metadata=bob, timeout=10))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused = exc
                break
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # under the limit: validated as usual
    assert refused is not None, "200 calls in a burst were never limited"
    retry = dict(refused.trailing_metadata() or ()).get("retry-after")
    assert retry and int(retry) >= 1 and f"retry after {retry}s" in refused.details()
    with pytest.raises(grpc.RpcError) as other:  # alice has her own bucket
        list(chat.Chat(chat_pb2.ChatRequest(message=""), metadata=[("authorization", "Bearer colloquy-dev-key-alice")],
                       timeout=10))
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(int(retry))
    with pytest.raises(grpc.RpcError) as again:
        list(chat.Chat(chat_pb2.ChatRequest(message=""), metadata=bob, timeout=10))
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_moderation_down_fails_closed(stack: Stack, chat) -> None:
    """A frozen moderation service (SIGSTOP: up but too slow to answer) makes the gateway refuse new
    chats with UNAVAILABLE instead of letting text through or hanging; it serves again on SIGCONT."""
    import urllib.request

    proc = stack.procs["moderation"]
    proc.signal(signal.SIGSTOP)
    try:
        err = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                run_chat(chat, "Hello there!", timeout=5)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and "moderation" in (exc.details() or ""):
                    err = exc
                    break
            time.sleep(0.5)
        assert err is not None, "the gateway never refused while moderation was frozen"
        assert "nothing was sent to the model" in err.details()
    finally:
        proc.signal(signal.SIGCONT)
    body = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['gateway']}/metrics",
                                  timeout=10).read().decode()
    assert 'colloquy_gateway_refused_total{reason="moderation_unavailable"}' in body
    deadline = time.monotonic() + 60
    while True:  # back to normal once the health check passes again
        try:
            *_, evs = run_chat(chat, "Hello again!", timeout=120)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(1)
    assert evs[-1].WhichOneof("event") == "done"


@pytest.mark.parametrize("victim", ["tokenizer", "prompt", "moderation"])
def test_sigkill_a_stage_mid_chat_loses_and_duplicates_no_turn(stack: Stack, chat, victim: str) -> None:
    conv, _, _, _ = run_chat(chat, "Remember the number 42.")
    result: dict = {}

    def second_turn() -> None:
        try:
            result["r"] = run_chat(chat, "Tell me a short story about a cat.", conv,
                                   sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=64), timeout=180)
        except grpc.RpcError as err:
            result["err"] = err

    t = threading.Thread(target=second_turn)
    t.start()
    time.sleep(0.3)
    stack.procs[victim].signal(signal.SIGKILL)
    stack.procs[victim].wait(10)
    stack.restart(victim)
    t.join(200)
    assert "r" in result, f"the chat failed: {result.get('err')}"
    _, idx, text, evs = result["r"]
    assert idx == 2 and text and evs[-1].WhichOneof("event") == "done"
    view = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    assert [t.index for t in view.turns] == [1, 2]
    assert view.turns[1].answers[0].text == text


def test_logs_carry_no_message_text_or_keys(stack: Stack, chat) -> None:
    """At the default level no service logs what users wrote, what the model answered, or API keys."""
    marker = f"zebra{uuid.uuid4().hex[:10]}"
    _, _, text, _ = run_chat(chat, f"Please remember the code word {marker} for me.")
    time.sleep(1.0)  # let the stages log whatever they log about this turn
    for name, proc in stack.procs.items():
        out = proc.output()
        assert marker not in out, f"{name} logged the user's message"
        assert "colloquy-dev-key" not in out, f"{name} logged an API key"
        if len(text) > 40:
            assert text[:40] not in out, f"{name} logged the answer"
