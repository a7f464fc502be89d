"""Protobuf <-> engine mapping and input validation, shared by the gRPC ingress and the Kafka worker.

Pure functions (no Ray, no I/O): every validation error names the field, in the gateway's
"field: what is wrong" style, and becomes INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable

from colloquy.v1 import common_pb2, events_pb2, generation_pb2

from services.common import sampling as common_sampling
from services.generation import engine

MAX_PROMPT_CHARS = 1 << 20
MAX_REQUEST_ID = 128
DEFAULT_MAX_TOKENS = 256
MAX_ANSWER_STOPS = 4
MAX_ANSWER_STOP_CHARS = 256

FINISH = {
    engine.FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    engine.FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    engine.FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    engine.FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}


class InvalidArgument(ValueError):
    """Bad input; the message starts with the field's name."""


def sampling(p: common_pb2.SamplingParams, *, max_tokens_limit: int, max_n: int) -> engine.Sampling:
    """Check ranges (documented in common.proto, shared with the gateway); max_tokens and n get
    their defaults here, the model-dependent fields stay None for the answering version to fill."""
    try:
        common_sampling.check(p, max_tokens_limit=max_tokens_limit, max_n=max_n)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None

    def opt(name: str) -> float | None:
        return float(getattr(p, name)) if p.HasField(name) else None

    return engine.Sampling(
        temperature=opt("temperature"), top_p=opt("top_p"),
        top_k=int(p.top_k) if p.HasField("top_k") else None, repetition_penalty=opt("repetition_penalty"),
        copy_penalty=opt("copy_penalty"),
        max_tokens=int(p.max_tokens) if p.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, max_tokens_limit),
        stop=tuple(p.stop), seed=int(p.seed) if p.HasField("seed") else None,
        n=int(p.n) if p.HasField("n") else 1)


def prompt(text: str) -> str:
    if not text or not text.strip():
        raise InvalidArgument("prompt: must not be empty or only whitespace")
    if "\x00" in text:
        raise InvalidArgument("prompt: contains a NUL character")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt: {len(text)} characters, at most {MAX_PROMPT_CHARS}")
    return text


def generate_request(req: generation_pb2.GenerateRequest, *, max_tokens_limit: int, max_n: int,
                     deadline_unix_ms: int = 0) -> engine.Request:
    """A validated engine request for a GenerateRequest (a request id is made when empty)."""
    text = prompt(req.prompt)
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} characters")
    params = sampling(req.sampling, max_tokens_limit=max_tokens_limit, max_n=max_n)
    return engine.Request(request_id=req.request_id or str(uuid.uuid4()), prompt=text, sampling=params,
                          deadline_unix_ms=deadline_unix_ms, conversation_id=req.conversation_id)


def answer_stops(texts: Iterable[str]) -> tuple[str, ...]:
    """The prompt stage's `answer_stops` of a turn, checked like the client's stop strings."""
    stops = tuple(texts)
    if len(stops) > MAX_ANSWER_STOPS:
        raise InvalidArgument(f"answer_stops: {len(stops)} texts, at most {MAX_ANSWER_STOPS}")
    for s in stops:
        if not s or len(s) > MAX_ANSWER_STOP_CHARS:
            raise InvalidArgument(f"answer_stops: each text must have 1 to {MAX_ANSWER_STOP_CHARS} characters")
    return stops


def turn_request(turn: events_pb2.TurnEvent, *, max_tokens_limit: int, max_n: int) -> engine.Request:
    """The engine request for a TurnEvent from chat.prompts (the gateway applied the defaults); the
    prompt stage's `answer_stops` join the client's stop strings."""
    if not turn.request_id:
        raise InvalidArgument("request_id: required")
    params = sampling(turn.sampling, max_tokens_limit=max_tokens_limit, max_n=max_n)
    params = dataclasses.replace(params, stop=params.stop + answer_stops(turn.answer_stops))
    return engine.Request(request_id=turn.request_id, prompt=prompt(turn.prompt), sampling=params,
                          deadline_unix_ms=turn.deadline_unix_ms, conversation_id=turn.conversation_id)


def responses(deltas: Iterable[engine.Delta]) -> list[generation_pb2.GenerateResponse]:
    """GenerateResponses for a batch of deltas; usage (this candidate's tokens) on a candidate's last."""
    out = []
    for d in deltas:
        msg = generation_pb2.GenerateResponse(index=d.index, delta=d.text, model_version=d.model_version,
                                              delta_tokens=d.tokens)
        if d.finish_reason is not None:
            msg.finish_reason = FINISH[d.finish_reason]
            msg.usage.prompt_tokens = d.prompt_tokens
            msg.usage.completion_tokens = d.completion_tokens
        out.append(msg)
    return out
