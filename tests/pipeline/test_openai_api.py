"""The OpenAI-compatible HTTP front (services/web) called with the real `openai` package, against
the whole running stack: every answer comes from the pipeline (gateway, moderation, prompt,
Ray Serve + ONNX model), and the gateway's own records (GetConversation over gRPC) are checked
against what the HTTP client saw. `-s` prints a short transcript."""

from __future__ import annotations

import time
import uuid

import grpc
import openai
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, events_pb2, generation_pb2

from devtools.stack import Stack
from services.common import topics
from services.prompt.config import DEFAULT_TEMPLATES
from services.prompt.templates import load_file
from tests.common.kafka_util import Tail
from tests.pipeline.progress import final_progress

# The served template's hidden instructions (services/prompt/templates.yaml), which the prompt
# service puts first in every prompt.
HIDDEN = load_file(DEFAULT_TEMPLATES).get().before

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

DEV_KEY = "colloquy-dev-key"
BOB_KEY = "colloquy-dev-key-bob"


def say(*parts: object) -> None:
    print("[openai]", *parts, flush=True)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.web}/v1", api_key=DEV_KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def history(stack: Stack):
    with grpc.insecure_channel(stack.gateway) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)

        def get(conversation_id: str) -> chat_pb2.Conversation:
            return stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conversation_id),
                                        metadata=[("authorization", f"Bearer {DEV_KEY}")], timeout=30)
        yield get


def test_chat_completion_answers_and_names_its_conversation(client: openai.OpenAI, history) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="colloquy", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24)
    done = raw.parse()
    body = done.model_dump()
    conv = raw.headers["x-colloquy-conversation-id"]
    say("chat.completions.create ->", repr(done.choices[0].message.content), done.choices[0].finish_reason,
        dict(done.usage or {}), "conversation", conv)
    assert body["conversation_id"] == conv and body["turn_index"] == 1
    assert done.object == "chat.completion" and done.model == "colloquy"
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    [turn] = history(conv).turns
    assert turn.user_message == "What is the capital of France?"
    assert turn.answers[0].text == choice.message.content  # what HTTP returned is what the gateway recorded


def test_streamed_chat_completion_arrives_in_chunks_and_ends_with_usage(client: openai.OpenAI, history) -> None:
    stream = client.chat.completions.create(
        model="colloquy", messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        temperature=0, max_tokens=60, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    say(f"stream=True -> {len(chunks)} chunks, {len(texts)} with text, finish {finishes}, usage",
        dict(chunks[-1].usage or {}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(texts) >= 2, "the answer must stream in several chunks"
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    conv = chunks[0].model_dump()["conversation_id"]
    assert history(conv).turns[0].answers[0].text == "".join(texts)


def test_n_2_returns_two_candidate_answers(client: openai.OpenAI, history) -> None:
    done = client.chat.completions.create(
        model="colloquy", messages=[{"role": "user", "content": "Name a fruit."}], n=2, temperature=0.8,
        seed=7, max_tokens=16)
    say("n=2 ->", [repr(c.message.content) for c in done.choices])
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.message.content.strip() for c in done.choices)
    [turn] = history(done.model_dump()["conversation_id"]).turns
    assert [a.text for a in turn.answers] == [c.message.content for c in done.choices]


def test_conversation_id_continues_the_conversation(client: openai.OpenAI, history) -> None:
    first = client.chat.completions.create(
        model="colloquy", messages=[{"role": "user", "content": "My dog is called Biscuit."}],
        temperature=0, max_tokens=16)
    conv = first.model_dump()["conversation_id"]
    second = client.chat.completions.create(
        model="colloquy", messages=[{"role": "user", "content": "What is my dog called?"}],
        temperature=0, max_tokens=16, extra_body={"conversation_id": conv})
    third = client.chat.completions.create(  # the header works as well as the field
        model="colloquy", messages=[{"role": "user", "content": "Thanks!"}],
        temperature=0, max_tokens=8, extra_headers={"X-Colloquy-Conversation-Id": conv})
    say("conversation_id", conv, "-> turns", [d.model_dump()["turn_index"] for d in (first, second, third)],
        "turn 2:", repr(second.choices[0].message.content))
    assert [d.model_dump()["conversation_id"] for d in (second, third)] == [conv, conv]
    assert [d.model_dump()["turn_index"] for d in (first, second, third)] == [1, 2, 3]
    assert [t.user_message for t in history(conv).turns] == [
        "My dog is called Biscuit.", "What is my dog called?", "Thanks!"]


def test_moderations_flag_hate_and_pass_a_greeting(client: openai.OpenAI) -> None:
    res = client.moderations.create(input=["Immigrants are subhuman parasites and I want to hurt them all.",
                                           "Good morning, how are you?"])
    threat, greeting = res.results
    say("moderations ->", res.model, [r.flagged for r in res.results],
        {k: round(v, 3) for k, v in threat.category_scores.model_dump(by_alias=True).items() if v > 0.2})
    assert len(threat.categories.model_dump(by_alias=True)) == 13
    assert len(threat.category_scores.model_dump(by_alias=True)) == 13
    assert threat.flagged and not greeting.flagged
    flagged = {k for k, v in threat.categories.model_dump(by_alias=True).items() if v}
    assert flagged & {"hate", "hate/threatening", "violence", "harassment"}, flagged
    assert not any(greeting.categories.model_dump(by_alias=True).values())


def test_responses_continue_with_previous_response_id_and_stream(client: openai.OpenAI, history) -> None:
    first = client.responses.create(model="colloquy", input="My cat is called Pixel.", temperature=0,
                                    max_output_tokens=16)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    events_seen = []
    deltas = []
    final = None
    with client.responses.stream(model="colloquy", input="What is my cat called?", temperature=0,
                                 max_output_tokens=16, previous_response_id=first.id) as stream:
        for ev in stream:
            events_seen.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    say("responses ->", first.id, repr(first.output_text), "| then", final.id, repr(final.output_text),
        "events", sorted(set(events_seen)))
    assert events_seen[0] == "response.created"
    assert events_seen[-1] in ("response.completed", "response.incomplete")
    assert deltas and "".join(deltas) == final.output_text
    body = final.model_dump()
    assert body["previous_response_id"] == first.id and body["turn_index"] == 2
    assert body["conversation_id"] == first.model_dump()["conversation_id"]
    turns = history(body["conversation_id"]).turns
    assert [t.user_message for t in turns] == ["My cat is called Pixel.", "What is my cat called?"]
    assert turns[1].answers[0].text == final.output_text


def test_models_lists_colloquy(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    say("models ->", ids)
    assert ids[0] == "colloquy"


def test_bad_temperature_is_400_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hi"}], temperature=3)
    say("temperature=3 ->", exc.value.status_code, exc.value.body)
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == "temperature" and "[0, 2]" in exc.value.body["message"]


def test_max_completion_tokens_out_of_range_is_named_as_sent(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=100000)
    assert exc.value.body["param"] == "max_completion_tokens"


def test_bad_key_is_401(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.web}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        bad.moderations.create(input="hello")
    say("bad key ->", exc.value.status_code, exc.value.body["message"])
    assert exc.value.status_code == 401


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    say("model=gpt-4o ->", exc.value.status_code, exc.value.body)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def recorded_prompts(turns: Tail, conversation_id: str, count: int) -> dict[int, str]:
    """The prompts the model saw in a conversation, from its TurnRecords (the source of truth)."""
    out: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(out) < count and time.monotonic() < deadline:
        for rec in turns.read(settle=0.2):
            if rec.value is None:  # a deleted conversation's tombstone
                continue
            msg = events_pb2.TurnRecord.FromString(rec.value)
            if msg.conversation_id == conversation_id:
                out[msg.turn.index] = msg.prompt
    return out


def test_earlier_messages_seed_a_new_conversation_for_every_turn(client: openai.OpenAI, history,
                                                                  kafka_bootstrap: str) -> None:
    turns = Tail(kafka_bootstrap, topics.CONVERSATION_TURNS.name)
    first = client.chat.completions.create(model="colloquy", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": "My cat is called Pixel."},
        {"role": "assistant", "content": "Pixel is a lovely name for a cat!"},
        {"role": "user", "content": "What is my cat called?"}])
    conv = first.model_dump()["conversation_id"]
    later = client.chat.completions.create(
        model="colloquy", temperature=0, max_tokens=24, extra_body={"conversation_id": conv},
        messages=[{"role": "user", "content": "Tell me my cat's name again."}])
    say("seeded: 'What is my cat called?' ->", repr(first.choices[0].message.content),
        "| turn 2 'Tell me my cat's name again.' ->", repr(later.choices[0].message.content))
    assert "pixel" in first.choices[0].message.content.lower()
    assert "pixel" in later.choices[0].message.content.lower()
    recorded = history(conv).turns
    assert [t.index for t in recorded] == [1, 2]
    assert [(e.user, e.assistant) for e in recorded[0].seed.exchanges] == [
        ("My cat is called Pixel.", "Pixel is a lovely name for a cat!")]
    assert not recorded[1].HasField("seed")
    prompts = recorded_prompts(turns, conv, 2)
    for i in (1, 2):  # the seed is in every turn's prompt, after the hidden instructions
        assert prompts[i].startswith(f"<|im_start|>system\n{HIDDEN}")
        assert prompts[i].index(HIDDEN) < prompts[i].index("My cat is called Pixel.")
    assert prompts[2].index("Pixel is a lovely name") < prompts[2].index("What is my cat called?") \
        < prompts[2].index("Tell me my cat's name again.")


def test_a_client_system_message_follows_the_hidden_instructions(client: openai.OpenAI,
                                                                  kafka_bootstrap: str) -> None:
    turns = Tail(kafka_bootstrap, topics.CONVERSATION_TURNS.name)
    question = {"role": "user", "content": "What is the capital of Italy?"}
    plain = client.chat.completions.create(model="colloquy", temperature=0, max_tokens=32, messages=[question])
    french = client.chat.completions.create(model="colloquy", temperature=0, max_tokens=32, messages=[
        {"role": "system", "content": "Always answer in French."}, question])
    say("'What is the capital of Italy?' ->", repr(plain.choices[0].message.content),
        "| with system 'Always answer in French.' ->", repr(french.choices[0].message.content))
    # The test stack's model (SmolLM2-135M, int4) follows such an instruction only loosely, so the
    # check is that the client's text reached the model (the greedy answer changed), not its language.
    assert french.choices[0].message.content != plain.choices[0].message.content
    conv = french.model_dump()["conversation_id"]
    prompt = recorded_prompts(turns, conv, 1)[1]
    system = prompt[:prompt.index("<|im_end|>")]
    say("recorded prompt's system message:", repr(system))
    assert system.startswith(f"<|im_start|>system\n{HIDDEN}")  # the operator's instructions stay first
    assert system.endswith("\n\nAlways answer in French.")


def test_a_seed_for_a_named_conversation_is_400_saying_why(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="colloquy", extra_body={"conversation_id": str(uuid.uuid4())}, messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}])
    assert exc.value.body["param"] == "messages" and "send only the new user message" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="colloquy", messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x\u0000"},
            {"role": "user", "content": "How are you?"}])
    say("a NUL in an earlier message ->", exc.value.status_code, exc.value.body)
    assert exc.value.body["param"] == "messages[1].content" and "NUL" in exc.value.body["message"]


def test_someone_elses_conversation_is_404(stack: Stack, client: openai.OpenAI) -> None:
    mine = client.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hello"}],
                                          temperature=0, max_tokens=4).model_dump()["conversation_id"]
    bob = openai.OpenAI(base_url=f"{stack.web}/v1", api_key=BOB_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        bob.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"conversation_id": mine})
    assert exc.value.body["param"] == "conversation_id"


def test_over_the_rate_limit_is_429_with_retry_after(stack: Stack) -> None:
    """The gateway's per-key limit (burst 30 in the test stack) applies through HTTP unchanged.
    Requests with a bad temperature cost a token each but never reach the model."""
    alice = openai.OpenAI(base_url=f"{stack.web}/v1", api_key="colloquy-dev-key-alice", max_retries=0)
    refused = None
    for _ in range(80):
        try:
            alice.chat.completions.create(model="colloquy", messages=[{"role": "user", "content": "Hi"}],
                                          temperature=9)
        except openai.BadRequestError:
            continue
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None, "80 quick requests never met the rate limit"
    say("rate limit ->", refused.status_code, "Retry-After", refused.response.headers.get("retry-after"),
        refused.body["message"])
    assert int(refused.response.headers["retry-after"]) >= 1
    time.sleep(4)  # give alice's budget back to the tests after this one


def test_client_that_disconnects_mid_stream_cancels_generation(client: openai.OpenAI, kafka_bootstrap: str) -> None:
    progress = Tail(kafka_bootstrap, topics.GENERATION_PROGRESS.name)
    stream = client.chat.completions.create(
        model="colloquy",
        messages=[{"role": "user", "content": f"Write a very long story about a dragon {uuid.uuid4().hex[:6]}."}],
        temperature=0, max_tokens=1000, stream=True)
    request_id = ""
    for c in stream:
        request_id = c.id.removeprefix("chatcmpl-")
        if c.choices and c.choices[0].delta.content:
            break
    stream.close()  # the HTTP connection goes away mid-answer
    final = final_progress(progress, request_id)
    assert final is not None, "generation never finished the abandoned request"
    [cand] = final.candidates
    say("disconnect after the first chunk -> generation", generation_pb2.FinishReason.Name(cand.finish_reason),
        "after", cand.tokens, "tokens")
    assert cand.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert cand.tokens < 500
