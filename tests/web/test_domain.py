"""services/web/domain.py: OpenAI request bodies -> ChatRequest, ChatEvents -> chunks and
completions, gRPC statuses -> OpenAI errors, moderation verdicts -> OpenAI's 13 categories."""

from __future__ import annotations

import uuid

import grpc
import pytest
from colloquy.v1 import chat_pb2, common_pb2, moderation_pb2

from services.web import domain

SERVED = ["colloquy", "smollm2-v1"]
CONV = "0b7e3b53-3a1e-4bbd-9d1f-5e0c3f1a2b3c"


def body(**kw: object) -> dict:
    return {"model": "colloquy", "messages": [{"role": "user", "content": "Hi"}], **kw}


def err(fn, *args, **kw) -> domain.ApiError:
    with pytest.raises(domain.ApiError) as exc:
        fn(*args, **kw)
    return exc.value


def test_chat_plan_maps_every_sampling_parameter() -> None:
    plan = domain.chat_plan(body(temperature=0.5, top_p=0.9, max_completion_tokens=40, n=2, stop=["\n", "END"],
                                 seed=3, user="u1", stream=True, stream_options={"include_usage": True}), SERVED)
    s = plan.request.sampling
    assert (s.temperature, round(s.top_p, 5), s.max_tokens, s.n, list(s.stop), s.seed) == (0.5, 0.9, 40, 2,
                                                                                           ["\n", "END"], 3)
    assert plan.request.message == "Hi" and plan.stream and plan.include_usage and plan.user == "u1"
    assert plan.renames == {"max_tokens": "max_completion_tokens"}
    ext = domain.chat_plan(body(top_k=5, repetition_penalty=1.2, copy_penalty=0), SERVED).request.sampling
    assert (ext.top_k, round(ext.repetition_penalty, 5)) == (5, 1.2)
    assert ext.HasField("copy_penalty") and ext.copy_penalty == 0.0


def test_unset_sampling_stays_unset_so_the_models_defaults_apply() -> None:
    s = domain.chat_plan(body(), SERVED).request.sampling
    assert not any(s.HasField(f) for f in ("temperature", "top_p", "max_tokens", "n", "seed"))


def test_a_single_stop_string_and_text_parts_are_accepted() -> None:
    plan = domain.chat_plan({"model": "colloquy", "stop": "x", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]}, SERVED)
    assert plan.request.message == "Hello" and list(plan.request.sampling.stop) == ["x"]


def test_conversation_id_comes_from_the_field_or_the_header_but_not_two_different_ones() -> None:
    assert domain.chat_plan(body(conversation_id=CONV), SERVED).request.conversation_id == CONV
    assert domain.chat_plan(body(), SERVED, header_conversation=CONV).request.conversation_id == CONV
    e = err(domain.chat_plan, body(conversation_id=CONV), SERVED, header_conversation=str(uuid.uuid4()))
    assert e.status == 400 and e.param == "conversation_id"


@pytest.mark.parametrize(("kw", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"seed": -5}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"bogus": 1}, "bogus"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}, "messages[0].role"),
])
def test_bad_chat_bodies_are_400_naming_the_parameter(kw: dict, param: str) -> None:
    e = err(domain.chat_plan, body(**kw), SERVED)
    assert (e.status, e.param) == (400, param), e.message
    assert e.message.startswith(param.split("[")[0]) or param in e.message


def test_earlier_messages_seed_a_new_conversation_system_first() -> None:
    plan = domain.chat_plan(body(messages=[
        {"role": "system", "content": "Always answer in French."}, {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "My cat is called Pixel."}, {"role": "assistant", "content": "Nice name!"},
        {"role": "user", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                                             {"type": "text", "text": "his name?"}]}]),
        SERVED)
    seed = plan.request.seed
    assert plan.request.message == "What is his name?" and not plan.request.conversation_id
    assert seed.system == "Always answer in French.\n\nBe brief."
    assert [(e.user, e.assistant) for e in seed.exchanges] == [("My cat is called Pixel.", "Nice name!"),
                                                               ("Hello", "")]
    # The gateway's seed fields name the messages they came from.
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "seed.exchanges[1].user: contains a NUL character",
                         renames=plan.renames)
    assert (e.param, e.message) == ("messages[4].content", "messages[4].content: contains a NUL character")
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "seed.exchanges[0].assistant: 9000 bytes, at most 8192",
                         renames=plan.renames)
    assert e.param == "messages[3].content"
    assert domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "seed.system: too long", renames=plan.renames).param \
        == "messages"
    assert domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "seed.exchanges: 40 exchanges, at most 32 allowed",
                            renames=plan.renames).param == "messages"
    assert domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "message: too long for the model's context",
                            renames=plan.renames).param == "messages[5].content"
    assert not domain.chat_plan(body(), SERVED).request.HasField("seed")


@pytest.mark.parametrize(("messages", "param", "words"), [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "messages[1]", "only before the first user message"),
    ([{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "c"}], "messages[0]",
     "must answer a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}], "messages[2]", "must answer a user message"),
])
def test_messages_that_cannot_seed_a_conversation_are_400_naming_the_message(messages: list, param: str,
                                                                              words: str) -> None:
    e = err(domain.chat_plan, body(messages=messages), SERVED)
    assert e.param == param and words in e.message


def test_earlier_messages_with_a_named_conversation_are_refused_with_directions() -> None:
    e = err(domain.chat_plan, body(conversation_id=str(uuid.uuid4()), messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]),
        SERVED)
    assert e.param == "messages" and "send only the new user message" in e.message


def test_model_must_be_served_else_404_model_not_found() -> None:
    assert domain.chat_plan(body(model="smollm2-v1"), SERVED).model == "smollm2-v1"
    e = err(domain.chat_plan, body(model="gpt-4o"), SERVED)
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model") and "colloquy" in e.message
    assert err(domain.chat_plan, {"messages": [{"role": "user", "content": "x"}]}, SERVED).param == "model"


def test_gateway_field_names_become_openai_parameters() -> None:
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature: 3.0 is outside [0, 2]")
    assert (e.status, e.param, e.message) == (400, "temperature", "temperature: 3.0 is outside [0, 2]")
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: 0 is outside [1, 1024]",
                         renames={"max_tokens": "max_completion_tokens"})
    assert e.param == "max_completion_tokens" and e.message.startswith("max_completion_tokens: 0")
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[1]: must be 1..64 characters, no NUL")
    assert e.param == "stop" and e.message.startswith("stop[1]:")
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "sampling.copy_penalty: 9.0 is outside [0, 5]")
    assert (e.param, e.message) == ("copy_penalty", "copy_penalty: 9.0 is outside [0, 5]")
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "message: must not be empty or only whitespace")
    assert e.param == "messages"


@pytest.mark.parametrize(("code", "status", "type_"), [
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    (grpc.StatusCode.ABORTED, 409, "invalid_request_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
])
def test_grpc_status_maps_to_http_status_and_error_type(code: grpc.StatusCode, status: int, type_: str) -> None:
    e = domain.from_grpc(code, "words for a person")
    assert (e.status, e.type) == (status, type_)
    assert e.body() == {"error": {"message": e.message, "type": type_, "param": e.param, "code": e.code}}
    assert e.message == "words for a person" or code is grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_tells_http_callers_which_header_to_send() -> None:
    e = domain.from_grpc(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key: send metadata 'authorization'")
    assert "Authorization: Bearer" in e.message and e.code == "invalid_api_key"


def test_rate_limit_carries_the_gateways_retry_after_trailer() -> None:
    e = domain.from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit", trailers=[("retry-after", "7")])
    assert e.retry_after == 7
    assert domain.from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity").retry_after == 1


def test_store_behind_503_carries_the_gateways_retry_after_and_other_503s_none() -> None:
    e = domain.from_grpc(grpc.StatusCode.UNAVAILABLE, "this conversation's history is still being saved",
                         trailers=[("retry-after", b"2")])
    assert (e.status, e.retry_after) == (503, 2)
    assert domain.from_grpc(grpc.StatusCode.UNAVAILABLE, "generation cannot be reached").retry_after is None


def events(*evs: chat_pb2.ChatEvent) -> domain.Turn:
    turn = domain.Turn()
    for ev in evs:
        turn.apply(ev)
    return turn


STARTED = chat_pb2.ChatEvent(started=chat_pb2.ChatStarted(conversation_id=CONV, turn_index=2, request_id="r1"))


def delta(text: str, index: int = 0) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(index=index, text=text))


def done(*reasons: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(done=chat_pb2.ChatDone(
        finish_reasons=[chat_pb2.FinishReasonEntry(index=i, reason=r) for i, r in enumerate(reasons)],
        usage=common_pb2.Usage(prompt_tokens=30, completion_tokens=5), model_version="v1"))


def test_completion_assembles_candidates_usage_and_conversation() -> None:
    turn = events(STARTED, delta("Par"), delta("A", 1), delta("is"), done("stop", "length"))
    out = domain.completion(turn, "colloquy", 100)
    assert out["id"] == "chatcmpl-r1" and out["conversation_id"] == CONV and out["turn_index"] == 2
    assert [(c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [("Paris", "stop"),
                                                                                       ("A", "length")]
    assert out["usage"] == {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
    assert out["model_version"] == "v1"


def test_an_input_block_is_content_filter_with_the_notice_as_refusal() -> None:
    notice = chat_pb2.ChatEvent(moderation=chat_pb2.ModerationNotice(
        stage="input", message="Your message was not sent: hate.",
        result=common_pb2.ModerationResult(flagged=True, categories={"hate": True},
                                           action=common_pb2.MODERATION_ACTION_BLOCK)))
    turn = events(STARTED, notice, done("blocked"))
    [choice] = domain.completion(turn, "colloquy", 1)["choices"]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["refusal"].startswith("Your message")
    chunks = domain.chunks_for(done("blocked"), turn, "colloquy", 1, False, 1)
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {"refusal": "Your message was not sent: hate."},
                                       "finish_reason": "content_filter", "logprobs": None}
    assert domain.completion(turn, "colloquy", 1)["moderation"][0]["categories"] == ["hate"]


def test_stream_chunks_role_then_text_then_finish_then_usage() -> None:
    turn = domain.Turn()
    out = []
    for ev in (STARTED, delta("Hi"), done("stop")):
        turn.apply(ev)
        out += domain.chunks_for(ev, turn, "colloquy", 9, True, 1)
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in out] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {}, None]
    assert out[2]["choices"][0]["finish_reason"] == "stop"
    assert [c["usage"] for c in out[:-1]] == [None, None, None]
    assert out[-1]["usage"]["total_tokens"] == 35 and out[-1]["choices"] == []
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in out)


def test_without_include_usage_chunks_carry_no_usage_key() -> None:
    turn = events(STARTED, done("stop"))
    assert all("usage" not in c for c in domain.chunks_for(done("stop"), turn, "colloquy", 1, False, 1))


def test_response_ids_round_trip_a_conversation_and_turn() -> None:
    rid = domain.response_id(CONV, 12)
    assert domain.parse_response_id(rid) == (CONV, 12)
    for bad in ("resp_xyz", "chatcmpl-1", 5, f"resp_{uuid.UUID(CONV).hex}_"):
        assert err(domain.parse_response_id, bad).param == "previous_response_id"


def test_response_plan_continues_the_conversation_of_previous_response_id() -> None:
    plan = domain.response_plan({"model": "colloquy", "input": "And then?", "max_output_tokens": 20,
                                 "previous_response_id": domain.response_id(CONV, 3)}, SERVED)
    assert plan.request.conversation_id == CONV and plan.request.sampling.max_tokens == 20
    prev = domain.response_id(CONV, 3)
    for extra, param in (({"instructions": "be brief"}, "instructions"),
                         ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "input")):
        e = err(domain.response_plan, {"model": "colloquy", "input": "x", "previous_response_id": prev, **extra},
                SERVED)
        assert e.param == param and "only a new conversation" in e.message
    assert err(domain.response_plan, {"model": "colloquy", "input": "x", "store": False}, SERVED).param == "store"


def test_response_instructions_and_earlier_input_seed_a_new_conversation() -> None:
    plan = domain.response_plan({"model": "colloquy", "instructions": "Always answer in French.", "input": [
        {"role": "user", "content": "My cat is called Pixel."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Nice name!"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "What is my cat called?"}]}]}, SERVED)
    seed = plan.request.seed
    assert plan.request.message == "What is my cat called?" and plan.instructions == "Always answer in French."
    assert seed.system == "Always answer in French."
    assert [(e.user, e.assistant) for e in seed.exchanges] == [("My cat is called Pixel.", "Nice name!")]
    assert plan.renames["seed.system"] == "instructions"
    assert plan.renames["seed.exchanges[0].assistant"] == "input[1].content"
    e = domain.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "seed.exchanges[0].user: contains a NUL character",
                         renames=plan.renames)
    assert e.param == "input[0].content"
    only = domain.response_plan({"model": "colloquy", "instructions": "Be brief.", "input": "Hi"}, SERVED)
    assert only.request.seed.system == "Be brief." and not only.request.seed.exchanges
    assert not domain.response_plan({"model": "colloquy", "input": "Hi"}, SERVED).request.HasField("seed")
    out = domain.response_object(events(STARTED, delta("Bonjour"), done("stop")), "colloquy", 1, None,
                                 instructions="Always answer in French.")
    assert out["instructions"] == "Always answer in French."


def test_response_object_marks_a_length_cut_incomplete() -> None:
    turn = events(STARTED, delta("Par"), done("length"))
    out = domain.response_object(turn, "colloquy", 1, None)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["content"][0]["text"] == "Par" and out["usage"]["output_tokens"] == 5


def test_moderation_result_has_openais_13_categories_with_unscored_ones_at_zero() -> None:
    r = common_pb2.ModerationResult(flagged=True, categories={"hate": True, "system_prompt_leak": True},
                                    category_scores={"hate": 0.9, "violence": 0.2})
    out = domain.moderation_result(r)
    assert list(out["categories"]) == list(domain.OPENAI_MODERATION_CATEGORIES) and len(out["categories"]) == 13
    assert out["categories"]["hate"] and not out["categories"]["violence"]
    assert out["category_scores"]["violence"] == pytest.approx(0.2) and out["category_scores"]["sexual"] == 0.0
    assert "system_prompt_leak" not in out["categories"] and out["flagged"]
    assert domain.UNSCORED_CATEGORIES == ()  # Colloquy's classifier scores every OpenAI category today


def test_moderation_inputs_accept_strings_and_text_parts_only() -> None:
    assert domain.moderation_inputs({"input": "a"}) == ["a"]
    assert domain.moderation_inputs({"input": ["a", {"type": "text", "text": "b"}]}) == ["a", "b"]
    assert err(domain.moderation_inputs, {"input": [{"type": "image_url"}]}).param == "input[0]"
    assert err(domain.moderation_inputs, {"input": []}).param == "input"
    resp = moderation_pb2.ModerateResponse(model="m1", results=[common_pb2.ModerationResult()])
    assert domain.moderation_response(resp, "x")["model"] == "m1"


def test_feedback_request_carries_a_rating_or_a_ranking() -> None:
    req = domain.feedback_request({"conversation_id": CONV, "turn_index": 2,
                                   "rating": {"answer_index": 1, "thumbs_up": False, "comment": "off topic"}})
    assert (req.conversation_id, req.turn_index, req.WhichOneof("feedback")) == (CONV, 2, "rating")
    assert (req.rating.answer_index, req.rating.thumbs_up, req.rating.comment) == (1, False, "off topic")
    req = domain.feedback_request({"conversation_id": CONV, "turn_index": 1, "ranking": {"order": [2, 0, 1]}})
    assert list(req.ranking.order) == [2, 0, 1] and list(req.ranking.tied_with_next) == []
    req = domain.feedback_request({"conversation_id": CONV, "turn_index": 1,
                                   "ranking": {"order": [2, 0, 1], "tied_with_next": [True, False]}})
    assert list(req.ranking.tied_with_next) == [True, False]


@pytest.mark.parametrize(("fb", "param"), [
    ({"turn_index": 1, "ranking": {"order": [0, 1]}}, "conversation_id"),
    ({"conversation_id": CONV, "ranking": {"order": [0, 1]}}, "turn_index"),
    ({"conversation_id": CONV, "turn_index": 1}, "rating"),
    ({"conversation_id": CONV, "turn_index": 1, "rating": {"thumbs_up": True}, "ranking": {"order": [0]}}, "rating"),
    ({"conversation_id": CONV, "turn_index": 1, "rating": {"answer_index": 0}}, "rating.thumbs_up"),
    ({"conversation_id": CONV, "turn_index": 1, "ranking": {"order": ["a"]}}, "ranking.order"),
    ({"conversation_id": CONV, "turn_index": 1, "ranking": {"order": [0, 1], "tied_with_next": [1]}},
     "ranking.tied_with_next"),
    ({"conversation_id": CONV, "turn_index": 1, "ranking": {"order": [0, 1], "ties": [True]}}, "ranking"),
])
def test_bad_feedback_is_400_naming_the_field(fb: dict, param: str) -> None:
    assert err(domain.feedback_request, fb).param == param


def test_a_retraction_keeps_only_the_kept_text_and_streams_as_an_extension_chunk() -> None:
    retract = chat_pb2.ChatEvent(retraction=chat_pb2.ChatRetraction(index=0, kept_chars=3))
    turn = events(STARTED, delta("Héllo"), delta(" world"), retract, done("moderated"))
    [choice] = domain.completion(turn, "colloquy", 1)["choices"]
    assert choice["message"]["content"] == "Hél" and choice["finish_reason"] == "content_filter"
    [chunk] = domain.chunks_for(retract, turn, "colloquy", 1, False, 1)
    assert chunk["choices"] == [] and chunk["retraction"] == {"index": 0, "kept_chars": 3}


def test_conversation_list_and_turns_in_the_page_s_shape() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp
    assert domain.list_request({}).page_size == 0
    assert domain.list_request({"limit": "20", "page_token": "abc"}) == chat_pb2.ListConversationsRequest(
        page_size=20, page_token="abc")
    for query, param in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"limit": "1001"}, "limit"),
                         ({"offset": "3"}, "offset")):
        e = err(domain.list_request, query)
        assert (e.status, e.param) == (400, param), e.message
    assert domain.conversation_request("c-1", {"limit": "5"}).page_size == 5
    summary = chat_pb2.ConversationSummary(conversation_id="c-1", title="My cat", created_at=Timestamp(seconds=10),
                                           last_activity_at=Timestamp(seconds=20))
    resp = chat_pb2.ListConversationsResponse(next_page_token="n", conversations=[summary])
    assert domain.conversation_list(resp) == {"object": "list", "next_page_token": "n", "data": [
        {"id": "c-1", "object": "conversation", "title": "My cat", "created_at": 10, "last_activity_at": 20}]}
    conv = chat_pb2.Conversation(conversation_id="c-1", turns=[
        chat_pb2.Turn(index=2, user_message="b", blocked=True,
                      answers=[chat_pb2.Answer(index=0, text="Sorry", finish_reason="blocked")]),
        chat_pb2.Turn(index=1, user_message="a", answers=[chat_pb2.Answer(index=1, text="y", finish_reason="length"),
                                                           chat_pb2.Answer(index=0, text="x", finish_reason="stop")])])
    got = domain.conversation(conv)
    assert [t["index"] for t in got["turns"]] == [1, 2] and got["next_page_token"] is None
    assert got["turns"][0]["answers"] == [{"index": 0, "text": "x", "finish_reason": "stop"},
                                          {"index": 1, "text": "y", "finish_reason": "length"}]
    assert got["turns"][1]["blocked"] and got["turns"][1]["answers"][0]["finish_reason"] == "content_filter"
