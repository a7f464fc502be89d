"""Input validation for ChatService (pure functions): every error names the field."""

from __future__ import annotations

import math
import uuid

from colloquy.v1 import chat_pb2, common_pb2

from services.gateway.config import GatewayConfig

MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_CLIENT_REQUEST_ID = 64
MAX_COMMENT_BYTES = 2048


class InvalidArgument(ValueError):
    """Bad input; the message names the field and says what is allowed."""


def conversation_id(value: str, field: str = "conversation_id", required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidArgument(f"{field}: required")
        return ""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field}: {value[:80]!r} is not a UUID") from None
    if str(parsed) != value.lower():
        raise InvalidArgument(f"{field}: use the canonical UUID form like {parsed}")
    return str(parsed)


def message(text: str, max_bytes: int) -> str:
    if "\x00" in text:
        raise InvalidArgument("message: contains a NUL character")
    if not text or not text.strip():
        raise InvalidArgument("message: must not be empty or only whitespace")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"message: {size} bytes, at most {max_bytes} allowed")
    return text


def sampling(p: common_pb2.SamplingParams, cfg: GatewayConfig) -> common_pb2.SamplingParams:
    """Check ranges and fill in defaults, so every later stage sees explicit values."""
    out = common_pb2.SamplingParams()
    temp = p.temperature if p.HasField("temperature") else 0.7
    if not math.isfinite(temp) or temp < 0 or temp > 2:
        raise InvalidArgument(f"sampling.temperature: {temp} is outside [0, 2]")
    out.temperature = temp
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or top_p <= 0 or top_p > 1:
        raise InvalidArgument(f"sampling.top_p: {top_p} is outside (0, 1]")
    out.top_p = top_p
    max_tokens = p.max_tokens if p.HasField("max_tokens") else cfg.default_max_tokens
    if max_tokens < 1 or max_tokens > cfg.max_tokens_limit:
        raise InvalidArgument(f"sampling.max_tokens: {max_tokens} is outside [1, {cfg.max_tokens_limit}]")
    out.max_tokens = max_tokens
    n = p.n if p.HasField("n") else 1
    if n < 1 or n > cfg.max_n:
        raise InvalidArgument(f"sampling.n: {n} is outside [1, {cfg.max_n}]")
    out.n = n
    if len(p.stop) > MAX_STOP:
        raise InvalidArgument(f"sampling.stop: {len(p.stop)} strings, at most {MAX_STOP}")
    for i, s in enumerate(p.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"sampling.stop[{i}]: must be 1..{MAX_STOP_CHARS} characters")
    out.stop.extend(p.stop)
    if p.HasField("seed"):
        out.seed = p.seed
    return out


def chat_request(req: chat_pb2.ChatRequest, cfg: GatewayConfig) -> tuple[str, str, common_pb2.SamplingParams]:
    """Returns (conversation_id or "", message, sampling with defaults)."""
    conv = conversation_id(req.conversation_id, required=False)
    text = message(req.message, cfg.max_message_bytes)
    if len(req.client_request_id) > MAX_CLIENT_REQUEST_ID:
        raise InvalidArgument(f"client_request_id: at most {MAX_CLIENT_REQUEST_ID} characters")
    return conv, text, sampling(req.sampling, cfg)


def feedback(req: chat_pb2.SubmitFeedbackRequest, turn: chat_pb2.Turn | None) -> None:
    """Check a rating or ranking against the turn it judges (None: no such turn)."""
    if req.turn_index < 1:
        raise InvalidArgument("turn_index: must be >= 1")
    kind = req.WhichOneof("feedback")
    if kind is None:
        raise InvalidArgument("feedback: set either rating or ranking")
    if turn is None:
        raise InvalidArgument(f"turn_index: the conversation has no turn {req.turn_index}")
    if turn.blocked:
        raise InvalidArgument(f"turn_index: turn {req.turn_index} was refused by moderation; nothing to rate")
    n = len(turn.answers)
    if kind == "rating":
        if req.rating.answer_index >= n:
            raise InvalidArgument(f"rating.answer_index: {req.rating.answer_index} is outside [0, {n - 1}]")
        if len(req.rating.comment.encode()) > MAX_COMMENT_BYTES:
            raise InvalidArgument(f"rating.comment: at most {MAX_COMMENT_BYTES} bytes")
    else:
        order = list(req.ranking.order)
        if n < 2:
            raise InvalidArgument("ranking: the turn has a single answer; rate it instead")
        if sorted(order) != list(range(n)):
            raise InvalidArgument(f"ranking.order: must be a permutation of 0..{n - 1}, got {order}")
