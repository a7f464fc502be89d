"""OpenAI HTTP shapes <-> Colloquy's ChatService and ModerationService messages (no I/O).

The web front is a translator: every check the gateway already makes (key, limits, ranges,
moderation) stays in the gateway, and its gRPC errors are translated back here. What this module
checks itself is only what gRPC cannot carry: JSON types, OpenAI parameters Colloquy has no
equivalent for, and message lists it cannot map onto a conversation (see `chat_plan`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from colloquy.v1 import chat_pb2, common_pb2, moderation_pb2

from services.common import retry_hint
from services.moderation.categories import CATEGORIES

# OpenAI's 13 moderation categories (omni-moderation), in its documentation's order.
OPENAI_MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
    "violence", "violence/graphic",
)
# Colloquy's classifier uses OpenAI's names; a category it did not score is reported as 0 / false.
UNSCORED_CATEGORIES: tuple[str, ...] = tuple(c for c in OPENAI_MODERATION_CATEGORIES if c not in CATEGORIES)

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
CONVERSATION_HEADER = "x-colloquy-conversation-id"

# Colloquy's per-candidate finish reasons -> OpenAI's. "blocked" (input refused) and "moderated"
# (answer cut) are both content filtering; "cancelled" only ends a stream nobody reads any more.
FINISH_REASONS = {"stop": "stop", "length": "length", "moderated": "content_filter",
                  "blocked": "content_filter", "cancelled": "stop"}

# Gateway field names (in its INVALID_ARGUMENT messages) -> the OpenAI parameter they came from.
GATEWAY_FIELDS = {
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.max_tokens": "max_tokens",
    "sampling.n": "n", "sampling.stop": "stop", "sampling.seed": "seed", "sampling.top_k": "top_k",
    "sampling.repetition_penalty": "repetition_penalty", "sampling.copy_penalty": "copy_penalty",
    "message": "messages",
    "conversation_id": "conversation_id", "client_request_id": "client_request_id",
}

# OpenAI chat parameters Colloquy cannot honour: accepted only at the value that means "off".
UNSUPPORTED_CHAT = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "service_tier": ("auto", "default"),
    "store": (False,), "metadata": ({},), "web_search_options": (), "verbosity": (),
}
CHAT_PARAMS = {
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "seed",
    "user", "stream", "stream_options", "conversation_id", "top_k", "repetition_penalty", "copy_penalty",
    *UNSUPPORTED_CHAT,
}
UNSUPPORTED_RESPONSES = {
    "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (), "reasoning": (),
    "text": ({"format": {"type": "text"}},), "truncation": ("disabled",), "include": ([],),
    "metadata": ({},), "service_tier": ("auto", "default"), "background": (False,), "prompt": (),
    "top_logprobs": (0,), "max_tool_calls": (),
}
RESPONSES_PARAMS = {
    "model", "input", "instructions", "previous_response_id", "temperature", "top_p", "max_output_tokens",
    "stream", "store", "user", *UNSUPPORTED_RESPONSES,
}


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, a sentence for the person, the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or error_type(status)
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# -- gRPC status -> OpenAI error --------------------------------------------------------------------

STATUS_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ABORTED: (409, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)?)(\[\d+\])?:\s*")
_PATH = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*(?:\[\d+\](?:\.[a-z_]+)*)?):\s*")  # seed.exchanges[2].user


def from_grpc(code: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, Any]] = (),
              renames: Mapping[str, str] | None = None) -> ApiError:
    """The OpenAI error for a gateway/moderation status. INVALID_ARGUMENT messages start with the
    gateway's field name ("sampling.temperature: 3 is outside [0, 2]"); it becomes the OpenAI
    parameter (`temperature`), in `param` and in the sentence. `renames` overrides a parameter
    name for this request (e.g. max_tokens -> max_completion_tokens when that is what was sent)."""
    status, err_code = STATUS_HTTP.get(code, (500, "internal_error"))
    message = details or "the request failed"
    param: str | None = None
    if (code is grpc.StatusCode.INVALID_ARGUMENT and (p := _PATH.match(message))
            and p.group(1) in (renames or {})):  # a field this request named exactly (a seed message)
        param = (renames or {})[p.group(1)]
        message = f"{param}: {message[p.end():]}"
    elif code is grpc.StatusCode.INVALID_ARGUMENT and (m := _FIELD.match(message)):
        field = m.group(1)
        param = GATEWAY_FIELDS.get(field, field)
        param = (renames or {}).get(param, param)
        message = f"{param}{m.group(2) or ''}: {message[m.end():]}"
    # HTTP's Retry-After from the gateway's hint (gateway/errors.py: every 429, and a 503 a plain
    # retry can cure). A 429 without one (an older gateway) still gets the smallest hint, 1 s.
    retry_after = retry_hint.read(trailers)
    if status == 429 and retry_after is None:
        retry_after = 1
    if code is grpc.StatusCode.NOT_FOUND:
        param = "conversation_id"
    if code is grpc.StatusCode.UNAUTHENTICATED:  # the gateway's sentence speaks of gRPC metadata
        message = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
    return ApiError(status, message, param=param, code=err_code, retry_after=retry_after)


def is_transport_failure(details: str) -> bool:
    """grpc's own words for a peer it could not reach or lost (not a service's sentence)."""
    low = details.lower()
    return any(s in low for s in ("failed to connect", "connection refused", "socket closed", "connection reset",
                                  "dns resolution failed", "connection attempt timed out"))


# -- request parsing --------------------------------------------------------------------------------

def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"{name}: must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise bad(name, f"{name}: must be a finite number")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int, what: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name}: must be an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise bad(name, f"{name}: {value} is not {what}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name}: must be true or false, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_known(body: Mapping[str, Any], known: set[str], unsupported: Mapping[str, tuple]) -> None:
    for name, value in body.items():
        if name not in known:
            raise ApiError(400, f"{name}: unrecognized request argument", param=name, code="unknown_parameter")
        if name in unsupported and value is not None and value not in unsupported[name]:
            raise ApiError(400, f"{name}: not supported by Colloquy (only its default is accepted)",
                           param=name, code="unsupported_parameter")


def _text_content(content: Any, param: str) -> str:
    """A message's content: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise bad(f"{param}[{j}]", f"{param}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                           "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(param, f"{param}: must be a string or an array of text parts, got {_kind(content)}")


def check_model(body: Mapping[str, Any], served: Iterable[str], required: bool = True) -> str:
    """The requested model id, which must be one the front serves (404 model_not_found otherwise)."""
    model = body.get("model")
    if model is None:
        if required:
            raise ApiError(400, "model: required; use \"colloquy\" (GET /v1/models lists the models)",
                           param="model", code="missing_required_parameter")
        return "colloquy"
    if not isinstance(model, str):
        raise bad("model", f"model: must be a string, got {_kind(model)}")
    names = list(served)
    if model not in names:
        raise ApiError(404, f"The model '{model[:100]}' does not exist; available: {', '.join(names)}",
                       param="model", code="model_not_found")
    return model


def conversation_id(body: Mapping[str, Any], header: str) -> str:
    """The conversation to continue: the `conversation_id` extension field or the header (not two different ones)."""
    value = body.get("conversation_id")
    if value is not None and not isinstance(value, str):
        raise bad("conversation_id", f"conversation_id: must be a string, got {_kind(value)}")
    value = value or ""
    header = header.strip()
    if value and header and value != header:
        raise bad("conversation_id", "conversation_id: the field and the X-Colloquy-Conversation-Id header "
                                     "name different conversations")
    return value or header


def sampling(body: Mapping[str, Any], max_tokens_names: tuple[str, ...]) -> common_pb2.SamplingParams:
    """OpenAI sampling parameters -> SamplingParams; ranges are the gateway's to check."""
    p = common_pb2.SamplingParams()
    if (t := _number(body, "temperature")) is not None:
        p.temperature = t
    if (t := _number(body, "top_p")) is not None:
        p.top_p = t
    if (t := _number(body, "repetition_penalty")) is not None:
        p.repetition_penalty = t
    if (t := _number(body, "copy_penalty")) is not None:
        p.copy_penalty = t
    if (k := _integer(body, "top_k", 0, UINT32_MAX, "a count >= 0")) is not None:
        p.top_k = k
    given = {name: v for name in max_tokens_names
             if (v := _integer(body, name, 0, UINT32_MAX, "a positive count of tokens")) is not None}
    if len(set(given.values())) > 1:
        raise bad(max_tokens_names[-1], f"{' and '.join(given)}: give one of them (they differ)")
    if given:
        p.max_tokens = next(iter(given.values()))
    if (n := _integer(body, "n", 1, UINT32_MAX, "a count >= 1")) is not None:
        p.n = n
    if (s := _integer(body, "seed", 0, UINT64_MAX, "in [0, 2^64)")) is not None:
        p.seed = s
    stop = body.get("stop")
    if isinstance(stop, str):
        p.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        p.stop.extend(stop)
    elif stop is not None:
        raise bad("stop", f"stop: must be a string or an array of strings, got {_kind(stop)}")
    return p


def conversation_seed(parsed: list[tuple[str, str]], name: str = "messages"
                      ) -> tuple[chat_pb2.ConversationSeed, dict[str, str]]:
    """The messages before the last (a user message) as a new conversation's seed, and the
    gateway's seed field names mapped to the messages they came from (for its errors).

    System (or developer) messages come first and are joined; then user and assistant messages
    alternate, each user message answered by the assistant message after it (or by nothing, if
    the next message is a user's: an empty answer). Colloquy shows the model the operator's
    instructions first, then these, then the new message.
    """
    seed = chat_pb2.ConversationSeed()
    fields: dict[str, str] = {}
    i = 0
    systems: list[str] = []
    while i < len(parsed) - 1 and parsed[i][0] in ("system", "developer"):
        systems.append(parsed[i][1])
        i += 1
    if systems:
        seed.system = "\n\n".join(systems)
        fields["seed.system"] = f"{name}[0].content" if len(systems) == 1 else name
    while i < len(parsed) - 1:
        role, text = parsed[i]
        if role in ("system", "developer"):
            raise bad(f"{name}[{i}]", f"{name}[{i}]: {role} messages are accepted only before the first "
                                        "user message (they follow the operator's instructions)")
        if role != "user":
            raise bad(f"{name}[{i}]", f"{name}[{i}]: an assistant message must answer a user message "
                                        "(earlier messages alternate user, assistant)")
        k = len(seed.exchanges)
        fields[f"seed.exchanges[{k}].user"] = f"{name}[{i}].content"
        answer = ""
        if parsed[i + 1][0] == "assistant" and i + 1 < len(parsed) - 1:
            answer = parsed[i + 1][1]
            fields[f"seed.exchanges[{k}].assistant"] = f"{name}[{i + 1}].content"
            i += 1
        seed.exchanges.add(user=text, assistant=answer)
        i += 1
    if fields:
        fields.update({"seed": name, "seed.exchanges": name})
    return seed, fields


@dataclasses.dataclass
class ChatPlan:
    """What one /v1/chat/completions request asks of the gateway, and how to answer it."""

    request: chat_pb2.ChatRequest
    model: str
    stream: bool
    include_usage: bool
    user: str
    renames: dict[str, str]  # OpenAI parameter names this request used where the gateway's differ


def chat_plan(body: Any, served: Iterable[str], header_conversation: str = "") -> ChatPlan:
    """Parse a chat completions body into a ChatRequest (raises ApiError naming the parameter)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_known(body, CHAT_PARAMS, UNSUPPORTED_CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages: required, a non-empty array of {\"role\", \"content\"} objects")
    model = check_model(body, served)
    conv = conversation_id(body, header_conversation)
    parsed: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}]: must be an object with a \"role\" string")
        parsed.append((m["role"], _text_content(m.get("content"), f"messages[{i}].content")))
    for i, (role, _) in enumerate(parsed):
        if role not in ("user", "assistant", "system", "developer"):
            raise bad(f"messages[{i}].role", f"messages[{i}].role: {role[:40]!r} is not supported; "
                                             "use \"system\", \"user\" or \"assistant\"")
    if parsed[-1][0] != "user":
        raise bad(f"messages[{len(parsed) - 1}]", "messages: the last message must be the user's (role \"user\")")
    if conv and len(parsed) > 1:
        raise bad("messages", (
            "messages: a conversation named by \"conversation_id\" (or the X-Colloquy-Conversation-Id header) "
            "already has its history; send only the new user message. Without a conversation id, the earlier "
            "messages start a new conversation"))
    seed, seed_fields = conversation_seed(parsed)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options: only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "stream_options: only {\"include_usage\": true|false} is supported")
        include_usage = _boolean(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user: must be a string, got {_kind(user)}")
    names = tuple(n for n in ("max_tokens", "max_completion_tokens") if body.get(n) is not None)
    renames = {"max_tokens": names[-1]} if names else {}
    renames.update(seed_fields)
    if seed_fields:
        renames["message"] = f"messages[{len(parsed) - 1}].content"
    req = chat_pb2.ChatRequest(conversation_id=conv, message=parsed[-1][1], seed=seed if seed_fields else None,
                               sampling=sampling(body, ("max_tokens", "max_completion_tokens")))
    return ChatPlan(req, model, stream, include_usage, user or "", renames)


# -- responses API ids ------------------------------------------------------------------------------

_RESPONSE_ID = re.compile(r"^resp_([0-9a-f]{32})_(\d{1,9})$")


def response_id(conversation: str, turn_index: int) -> str:
    """A Responses API id names one turn: the conversation (hex) and the turn index."""
    return f"resp_{uuid.UUID(conversation).hex}_{turn_index}"


def parse_response_id(value: Any, param: str = "previous_response_id") -> tuple[str, int]:
    """(conversation id, turn index) of a response id made by `response_id`."""
    if not isinstance(value, str) or not (m := _RESPONSE_ID.match(value)):
        raise bad(param, f"{param}: not a response id of this server (resp_<32 hex>_<turn>)")
    return str(uuid.UUID(m.group(1))), int(m.group(2))


@dataclasses.dataclass
class ResponsePlan:
    """What one /v1/responses request asks of the gateway."""

    request: chat_pb2.ChatRequest
    model: str
    stream: bool
    previous_response_id: str | None
    renames: dict[str, str] = dataclasses.field(default_factory=dict)
    instructions: str | None = None


def response_plan(body: Any, served: Iterable[str]) -> ResponsePlan:
    """Parse a Responses API body (text input only) into a ChatRequest. Without
    previous_response_id, `instructions` and the input messages before the last start the new
    conversation (its seed), as chat completions' `messages` do."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_known(body, RESPONSES_PARAMS, UNSUPPORTED_RESPONSES)
    model = check_model(body, served)
    if body.get("store") is False:
        raise bad("store", "store: every Colloquy turn is stored in its conversation; store=false cannot be honoured")
    prev = body.get("previous_response_id")
    raw = body.get("input")
    if isinstance(raw, str):
        parsed = [("user", raw)]
    elif isinstance(raw, list) and raw:
        parsed = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("role"), str):
                raise bad(f"input[{i}]", f"input[{i}]: must be a message ({{\"role\", \"content\"}})")
            if item["role"] not in ("user", "assistant", "system", "developer"):
                raise bad(f"input[{i}].role", f"input[{i}].role: {item['role'][:40]!r} is not supported")
            parsed.append((item["role"], _text_content(item.get("content"), f"input[{i}].content")))
        if parsed[-1][0] != "user":
            raise bad(f"input[{len(parsed) - 1}]", "input: the last message must be the user's (role \"user\")")
    else:
        raise bad("input", "input: required, a string or a non-empty array of messages")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", f"instructions: must be a string, got {_kind(instructions)}")
    if prev is not None and (instructions or len(parsed) > 1):
        param = "instructions" if instructions else "input"
        raise bad(param, f"{param}: only a new conversation (no previous_response_id) takes instructions or earlier "
                         "messages; a continued one keeps those it started with")
    seed, renames = conversation_seed(parsed, "input")
    if instructions:  # first, before any system message of the input
        seed.system = f"{instructions}\n\n{seed.system}" if seed.system else instructions
        renames["seed.system"] = "input" if "seed.system" in renames else "instructions"
        renames.setdefault("seed", "instructions")
    if renames:
        renames["message"] = f"input[{len(parsed) - 1}].content" if isinstance(raw, list) else "input"
    conv = parse_response_id(prev)[0] if prev is not None else ""
    p = sampling({k: body.get(k) for k in ("temperature", "top_p", "max_output_tokens")}, ("max_output_tokens",))
    return ResponsePlan(chat_pb2.ChatRequest(conversation_id=conv, message=parsed[-1][1], sampling=p,
                                             seed=seed if renames else None),
                        model, _boolean(body, "stream"), prev, renames, instructions or None)


# -- answers ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Turn:
    """A finished (or finishing) turn, assembled from ChatEvents."""

    conversation_id: str = ""
    turn_index: int = 0
    request_id: str = ""
    texts: dict[int, str] = dataclasses.field(default_factory=dict)
    refusals: dict[int, str] = dataclasses.field(default_factory=dict)
    notices: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finish: dict[int, str] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_version: str = ""
    done: bool = False

    def apply(self, ev: chat_pb2.ChatEvent) -> None:
        kind = ev.WhichOneof("event")
        if kind == "started":
            self.conversation_id = ev.started.conversation_id
            self.turn_index = ev.started.turn_index
            self.request_id = ev.started.request_id
        elif kind == "delta":
            self.texts[ev.delta.index] = self.texts.get(ev.delta.index, "") + ev.delta.text
        elif kind == "retraction":  # stream-first moderation withdrew text past kept_chars
            text = self.texts.get(ev.retraction.index, "")
            self.texts[ev.retraction.index] = text[:ev.retraction.kept_chars]
        elif kind == "moderation":
            note = notice(ev.moderation)
            self.notices.append(note)
            if note["action"] == "block":
                self.refusals[note["index"]] = ev.moderation.message
        elif kind == "done":
            self.done = True
            self.finish = {f.index: f.reason for f in ev.done.finish_reasons}
            self.prompt_tokens = ev.done.usage.prompt_tokens
            self.completion_tokens = ev.done.usage.completion_tokens
            self.model_version = ev.done.model_version
            if any(r == "blocked" for r in self.finish.values()):  # an input block refuses every candidate
                msg = next((n["message"] for n in self.notices if n["stage"] == "input"), "")
                for i in self.finish:
                    self.refusals.setdefault(i, msg)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def notice(m: chat_pb2.ModerationNotice) -> dict[str, Any]:
    """A moderation notice as the `moderation` extension field carries it."""
    action = {common_pb2.MODERATION_ACTION_WARN: "warn", common_pb2.MODERATION_ACTION_BLOCK: "block"}.get(
        m.result.action, "allow")
    return {"stage": m.stage, "index": m.index, "action": action, "message": m.message,
            "categories": sorted(c for c, hit in m.result.categories.items() if hit)}


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason for a Colloquy one ("error" never reaches here: it fails the request)."""
    return FINISH_REASONS.get(reason, "stop")


def failed_candidates(turn: Turn) -> list[int]:
    return sorted(i for i, r in turn.finish.items() if r == "error")


def completion(turn: Turn, model: str, created: int) -> dict[str, Any]:
    """The chat.completion object of a finished turn."""
    indexes = sorted(set(turn.finish) | set(turn.texts))
    choices = [{
        "index": i,
        "message": {"role": "assistant", "content": turn.texts.get(i, ""), "refusal": turn.refusals.get(i)},
        "finish_reason": finish_reason(turn.finish.get(i, "stop")), "logprobs": None,
    } for i in indexes]
    out = {"id": completion_id(turn), "object": "chat.completion", "created": created, "model": model,
           "choices": choices, "usage": turn.usage(), "system_fingerprint": None,
           "conversation_id": turn.conversation_id, "turn_index": turn.turn_index,
           "model_version": turn.model_version}
    if turn.notices:
        out["moderation"] = turn.notices
    return out


def completion_id(turn: Turn) -> str:
    return f"chatcmpl-{turn.request_id or uuid.uuid4().hex}"


def chunk(turn: Turn, model: str, created: int, choices: list[dict[str, Any]], include_usage: bool,
          **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk; with include_usage every chunk carries "usage": null but the last."""
    out = {"id": completion_id(turn), "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": choices, "conversation_id": turn.conversation_id,
           "turn_index": turn.turn_index, **extra}
    if include_usage and "usage" not in out:
        out["usage"] = None
    return out


def chunks_for(ev: chat_pb2.ChatEvent, turn: Turn, model: str, created: int, include_usage: bool,
               n: int) -> list[dict[str, Any]]:
    """The chunks one ChatEvent becomes (after `turn.apply(ev)`)."""
    kind = ev.WhichOneof("event")

    def choice(i: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}

    if kind == "started":
        return [chunk(turn, model, created, [choice(i, {"role": "assistant", "content": ""}) for i in range(n)],
                      include_usage)]
    if kind == "delta":
        return [chunk(turn, model, created, [choice(ev.delta.index, {"content": ev.delta.text})], include_usage)]
    if kind == "retraction":  # an extension field, like `moderation`: OpenAI's chunks cannot withdraw text
        return [chunk(turn, model, created, [], include_usage, retraction={
            "index": ev.retraction.index, "kept_chars": ev.retraction.kept_chars})]
    if kind == "moderation":
        note = turn.notices[-1]
        if note["action"] != "block" or note["stage"] == "input":  # an input block is told with every candidate's end
            return [chunk(turn, model, created, [], include_usage, moderation=note)]
        return [chunk(turn, model, created, [choice(note["index"], {"refusal": note["message"]})], include_usage,
                      moderation=note)]
    if kind == "done":
        out = []
        for i in sorted(turn.finish):
            delta = {"refusal": turn.refusals[i]} if turn.finish[i] == "blocked" and turn.refusals.get(i) else {}
            out.append(chunk(turn, model, created, [choice(i, delta, finish_reason(turn.finish[i]))], include_usage,
                             model_version=turn.model_version))
        if include_usage:
            out.append(chunk(turn, model, created, [], include_usage, usage=turn.usage()))
        return out
    return []


def response_object(turn: Turn, model: str, created: int, previous: str | None, status: str = "completed",
                    text: str | None = None, instructions: str | None = None) -> dict[str, Any]:
    """The Responses API `response` object of a turn (one candidate); `instructions` as sent."""
    reason = turn.finish.get(0, "")
    content = turn.texts.get(0, "") if text is None else text
    incomplete = None
    if status == "completed" and reason in ("length", "moderated", "blocked"):
        status = "incomplete"
        incomplete = {"reason": "max_output_tokens" if reason == "length" else "content_filter"}
    rid = response_id(turn.conversation_id, turn.turn_index) if turn.conversation_id else ""
    output = []
    if status != "in_progress":
        parts: list[dict[str, Any]] = [{"type": "output_text", "text": content, "annotations": []}]
        if turn.refusals.get(0):
            parts.append({"type": "refusal", "refusal": turn.refusals[0]})
        output.append({"type": "message", "id": message_id(rid), "status": status, "role": "assistant",
                       "content": parts})
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "previous_response_id": previous, "incomplete_details": incomplete, "error": None,
        "instructions": instructions, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "conversation_id": turn.conversation_id, "turn_index": turn.turn_index,
    }
    if turn.done:
        out["usage"] = {"input_tokens": turn.prompt_tokens, "output_tokens": turn.completion_tokens,
                        "total_tokens": turn.prompt_tokens + turn.completion_tokens}
        out["model_version"] = turn.model_version
    if turn.notices:
        out["moderation"] = turn.notices
    return out


def message_id(response: str) -> str:
    return "msg_" + response.removeprefix("resp_")


# -- moderations ------------------------------------------------------------------------------------

def moderation_inputs(body: Any) -> list[str]:
    """The texts of a /v1/moderations body: a string, an array of strings or of text parts."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_known(body, {"input", "model"}, {})
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("model", f"model: must be a string, got {_kind(body['model'])}")
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                out.append(item["text"])
            else:
                raise bad(f"input[{i}]", f"input[{i}]: only text is supported (a string or "
                                         "{\"type\": \"text\", \"text\": ...})")
        return out
    raise bad("input", "input: required, a string or a non-empty array of strings")


def moderation_result(r: common_pb2.ModerationResult) -> dict[str, Any]:
    """One Colloquy verdict in OpenAI's shape: all 13 categories, unscored ones as false / 0."""
    categories = {c: bool(r.categories.get(c, False)) for c in OPENAI_MODERATION_CATEGORIES}
    scores = {c: float(r.category_scores.get(c, 0.0)) for c in OPENAI_MODERATION_CATEGORIES}
    return {"flagged": any(categories.values()), "categories": categories, "category_scores": scores}


def moderation_response(resp: moderation_pb2.ModerateResponse, request_id: str) -> dict[str, Any]:
    return {"id": f"modr-{request_id}", "model": resp.model, "results": [moderation_result(r) for r in resp.results]}


def models(ids: Iterable[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "colloquy"}
                                       for m in ids]}


# -- feedback (the page's thumbs and rankings) ------------------------------------------------------

def feedback_request(body: Any) -> chat_pb2.SubmitFeedbackRequest:
    """{"conversation_id", "turn_index", "rating": {...}} or {..., "ranking": {"order": [...],
    "tied_with_next": [...] (optional)}} ->
    SubmitFeedbackRequest; the gateway checks them against the turn."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_known(body, {"conversation_id", "turn_index", "rating", "ranking"}, {})
    conv = body.get("conversation_id")
    if not isinstance(conv, str) or not conv:
        raise bad("conversation_id", "conversation_id: required, the id returned with the answer")
    turn = _integer(body, "turn_index", 1, UINT32_MAX, "a turn index >= 1")
    if turn is None:
        raise bad("turn_index", "turn_index: required, the turn_index returned with the answer")
    req = chat_pb2.SubmitFeedbackRequest(conversation_id=conv, turn_index=turn)
    rating, ranking = body.get("rating"), body.get("ranking")
    if (rating is None) == (ranking is None):
        raise bad("rating", "send either rating or ranking")
    if rating is not None:
        if not isinstance(rating, dict) or set(rating) - {"answer_index", "thumbs_up", "comment"}:
            raise bad("rating", "rating: {\"answer_index\": int, \"thumbs_up\": bool, \"comment\": str}")
        index = _integer(rating, "answer_index", 0, UINT32_MAX, "a candidate index >= 0") or 0
        comment = rating.get("comment") or ""
        if not isinstance(comment, str):
            raise bad("rating.comment", "rating.comment: must be a string")
        if not isinstance(rating.get("thumbs_up"), bool):
            raise bad("rating.thumbs_up", "rating.thumbs_up: required, true or false")
        req.rating.CopyFrom(chat_pb2.Rating(answer_index=index, thumbs_up=rating["thumbs_up"], comment=comment))
    else:
        if not isinstance(ranking, dict) or set(ranking) - {"order", "tied_with_next"}:
            raise bad("ranking", "ranking: {\"order\": [int], \"tied_with_next\": [bool] (optional)}")
        order = ranking.get("order")
        if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 64
                                                  for i in order):
            raise bad("ranking.order", "ranking.order: required, the candidate indexes best first")
        ties = ranking.get("tied_with_next") or []
        if not isinstance(ties, list) or not all(isinstance(t, bool) for t in ties):
            raise bad("ranking.tied_with_next", "ranking.tied_with_next: a list of true/false, one per neighbouring "
                      "pair of order (true: as good as the next)")
        req.ranking.CopyFrom(chat_pb2.Ranking(order=order, tied_with_next=ties))
    return req


# -- conversations (the page's list: new, open, delete) ---------------------------------------------

MAX_PAGE_SIZE = 1000


def list_request(query: Mapping[str, str]) -> chat_pb2.ListConversationsRequest:
    """GET /v1/conversations?limit=&page_token= -> ListConversationsRequest (the gateway checks the token)."""
    unknown = set(query) - {"limit", "page_token"}
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(400, f"{name}: unrecognized query parameter (use limit, page_token)", param=name,
                       code="unknown_parameter")
    return chat_pb2.ListConversationsRequest(page_size=_query_limit(query), page_token=query.get("page_token", ""))


def conversation_request(conversation: str, query: Mapping[str, str]) -> chat_pb2.GetConversationRequest:
    """GET /v1/conversations/{id}?limit=&page_token= -> GetConversationRequest."""
    unknown = set(query) - {"limit", "page_token"}
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(400, f"{name}: unrecognized query parameter (use limit, page_token)", param=name,
                       code="unknown_parameter")
    return chat_pb2.GetConversationRequest(conversation_id=conversation, page_size=_query_limit(query),
                                           page_token=query.get("page_token", ""))


def _query_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return 0  # the gateway's default page
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise bad("limit", f"limit: {raw[:20]!r} is not a count in [1, {MAX_PAGE_SIZE}]")
    return int(raw)


def _seconds(ts: Any) -> int:
    return int(ts.seconds)


def conversation_list(resp: chat_pb2.ListConversationsResponse) -> dict[str, Any]:
    """One page of the caller's conversations, most recent activity first."""
    return {"object": "list", "next_page_token": resp.next_page_token or None, "data": [
        {"id": c.conversation_id, "object": "conversation", "title": c.title, "created_at": _seconds(c.created_at),
         "last_activity_at": _seconds(c.last_activity_at)} for c in resp.conversations]}


def conversation(conv: chat_pb2.Conversation) -> dict[str, Any]:
    """A conversation's visible turns (one page): what the page shows when it is opened."""
    return {"id": conv.conversation_id, "object": "conversation", "next_page_token": conv.next_page_token or None,
            "turns": [{"index": t.index, "user_message": t.user_message, "blocked": t.blocked,
                       "created_at": _seconds(t.created_at), "model_version": t.model_version,
                       "answers": [{"index": a.index, "text": a.text, "finish_reason": finish_reason(a.finish_reason)}
                                   for a in sorted(t.answers, key=lambda a: a.index)]}
                      for t in sorted(conv.turns, key=lambda t: t.index)]}
