"""Gateway metrics: what a client sees end to end (through the whole pipeline)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

ACTIVE_CHATS = Gauge("colloquy_gateway_active_chats", "Chat streams this replica holds")
CHATS = Counter("colloquy_gateway_chats_total", "Chat calls by outcome (gRPC status code name)", ["code"])
TTFT = Histogram("colloquy_gateway_time_to_first_token_seconds",
                 "From accepting a Chat to sending its first answer text, through every stage",
                 buckets=LATENCY_BUCKETS)
CHAT_DURATION = Histogram("colloquy_gateway_chat_duration_seconds", "Whole Chat call, accepted to done",
                          buckets=LATENCY_BUCKETS)
STREAMED_CHARS = Counter("colloquy_gateway_streamed_characters_total", "Answer characters sent to clients")
REFUSED = Counter("colloquy_gateway_refused_total",
                  "Calls refused, by reason (capacity, user_concurrency, rate_limit, unavailable, store_behind, "
                  "moderation_unavailable, moderation_timeout)", ["reason"])
KEY_RELOAD_ERRORS = Counter("colloquy_gateway_api_key_reload_errors_total",
                            "Versions of the API key file that were rejected (the last good keys stay in use)")
KEYS_RELOAD_OK = Gauge("colloquy_gateway_api_keys_last_reload_ok",
                       "1 when the API key file on disk is the one in use; 0 while a rejected version is on disk")
IDEMPOTENT_RETRIES = Counter("colloquy_gateway_idempotent_retries_total",
                             "Chats answered with a turn their client_request_id had made already: replayed from "
                             "the history or attached to the stream in flight", ["how"])


def api_keys_reloaded(ok: bool) -> None:
    """The gateway's KeyRing hook: a version of the key file was taken into use (ok) or rejected."""
    KEYS_RELOAD_OK.set(1 if ok else 0)
    if not ok:
        KEY_RELOAD_ERRORS.inc()
