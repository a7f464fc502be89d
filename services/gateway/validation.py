"""Input validation for ChatService (pure functions): every error names the field."""

from __future__ import annotations

import uuid

from colloquy.v1 import chat_pb2, common_pb2

from services.common import sampling as common_sampling
from services.gateway.config import GatewayConfig

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
    """Check ranges; fill in max_tokens and n. The model-dependent fields stay unset: the model
    version that answers fills them from its manifest (so a rollout can change them)."""
    try:
        common_sampling.check(p, max_tokens_limit=cfg.max_tokens_limit, max_n=cfg.max_n)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    out = common_pb2.SamplingParams()
    out.CopyFrom(p)
    if not p.HasField("max_tokens"):
        out.max_tokens = cfg.default_max_tokens
    if not p.HasField("n"):
        out.n = 1
    return out


def _seed_text(text: str, field: str, max_bytes: int, required: bool) -> int:
    """UTF-8 size of one seed text, checked like a message (empty allowed where not required)."""
    if "\x00" in text:
        raise InvalidArgument(f"{field}: contains a NUL character")
    if required and not text.strip():
        raise InvalidArgument(f"{field}: must not be empty or only whitespace")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{field}: {size} bytes, at most {max_bytes} allowed")
    return size


def seed(s: chat_pb2.ConversationSeed, conv: str, cfg: GatewayConfig) -> None:
    """A new conversation's seed: only without a conversation id, bounded in count and bytes."""
    if not s.system and not s.exchanges:
        return
    if conv:
        raise InvalidArgument("seed: only a new conversation can be seeded (conversation_id must be empty); "
                              "its earlier turns are already its history")
    if len(s.exchanges) > cfg.max_seed_exchanges:
        raise InvalidArgument(f"seed.exchanges: {len(s.exchanges)} exchanges, at most {cfg.max_seed_exchanges} "
                              "allowed")
    total = _seed_text(s.system, "seed.system", cfg.max_message_bytes, required=False)
    for i, ex in enumerate(s.exchanges):
        total += _seed_text(ex.user, f"seed.exchanges[{i}].user", cfg.max_message_bytes, required=True)
        total += _seed_text(ex.assistant, f"seed.exchanges[{i}].assistant", cfg.max_message_bytes, required=False)
    if total > cfg.max_seed_bytes:
        raise InvalidArgument(f"seed: {total} bytes of text in all, at most {cfg.max_seed_bytes} allowed")


def chat_request(req: chat_pb2.ChatRequest, cfg: GatewayConfig) -> tuple[str, str, common_pb2.SamplingParams]:
    """Returns (conversation_id or "", message, sampling with defaults); checks the seed too."""
    conv = conversation_id(req.conversation_id, required=False)
    text = message(req.message, cfg.max_message_bytes)
    if len(req.client_request_id) > MAX_CLIENT_REQUEST_ID:
        raise InvalidArgument(f"client_request_id: at most {MAX_CLIENT_REQUEST_ID} characters")
    seed(req.seed, conv, cfg)
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
        ties = len(req.ranking.tied_with_next)
        if ties not in (0, n - 1):
            raise InvalidArgument(f"ranking.tied_with_next: one entry per neighbouring pair of order ({n - 1}), "
                                  f"or none for a strict ranking; got {ties}")
