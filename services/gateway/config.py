"""Gateway configuration (environment variables; docs/configuration.md)."""

from __future__ import annotations

import dataclasses

from services.common.config import env, positive
from services.conversation.config import StoreConfig

# The public entrance: with TLS_DIR it serves TLS without asking callers for certificates
# (they authenticate with API keys); the internal services require them (mutual TLS).
DEFAULTS = {"GRPC_PORT": "50051", "METRICS_PORT": "9101", "TLS_CLIENT_AUTH": "none"}
REQUEST_OVERHEAD_BYTES = 8192  # every ChatService request field but the message, with room to spare


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    api_keys_file: str = env("API_KEYS_FILE", "deploy/dev/api-keys.yaml")
    max_message_bytes: int = env("CHAT_MAX_MESSAGE_BYTES", 8192, check=lambda v: 1 <= v <= 1 << 20,
                                 hint="1..1048576 bytes")
    # A new conversation's seed (ChatRequest.seed): earlier exchanges and the client's system
    # text, bounded in count and in total bytes (each text is also held to CHAT_MAX_MESSAGE_BYTES).
    max_seed_exchanges: int = env("CHAT_MAX_SEED_EXCHANGES", 32, check=lambda v: 0 <= v <= 1024,
                                  hint="0..1024 (0 = no seeds)")
    max_seed_bytes: int = env("CHAT_MAX_SEED_BYTES", 32768, check=lambda v: 0 <= v <= 1 << 22,
                              hint="0..4194304 bytes")
    max_tokens_limit: int = env("CHAT_MAX_TOKENS_LIMIT", 1024, check=lambda v: 1 <= v <= 8192,
                                hint="1..8192")
    default_max_tokens: int = env("CHAT_DEFAULT_MAX_TOKENS", 256, check=lambda v: v >= 1, hint=">= 1")
    max_n: int = env("CHAT_MAX_N", 4, check=lambda v: 1 <= v <= 8, hint="1..8")
    default_deadline_s: float = env("CHAT_DEFAULT_DEADLINE_SECONDS", 120.0, check=positive,
                                    hint="seconds > 0")
    max_concurrent_chats: int = env("CHAT_MAX_CONCURRENT", 64, check=lambda v: v >= 1, hint=">= 1")
    # Chats one API key may hold open at once on this replica (0 = no per-user cap), so one key
    # cannot take every slot of CHAT_MAX_CONCURRENT.
    max_chats_per_user: int = env("CHAT_MAX_CONCURRENT_PER_USER", 4, check=lambda v: v >= 0,
                                  hint=">= 0 (0 = no per-user cap)")
    reply_idle_timeout_s: float = env("CHAT_REPLY_IDLE_TIMEOUT_SECONDS", 60.0, check=positive,
                                      hint="seconds > 0")
    # Fail closed: with an address, new chats are refused (UNAVAILABLE) while moderation's health
    # check fails; empty: no check (a gateway tested alone).
    moderation_addr: str = env("MODERATION_ADDR", "")
    # A turn that has not passed the checks before generation (input moderation, prompt)
    # within this time is cancelled and refused (UNAVAILABLE) rather than left waiting.
    check_timeout_s: float = env("CHAT_CHECK_TIMEOUT_SECONDS", 30.0, check=positive, hint="seconds > 0")
    # Per-user limit on every ChatService call: a sustained rate and a burst (0 = off).
    user_rate_per_minute: float = env("CHAT_USER_RATE_PER_MINUTE", 60.0, check=lambda v: v >= 0,
                                      hint="calls per minute >= 0 (0 = no limit)")
    user_burst: int = env("CHAT_USER_BURST", 10, check=lambda v: v >= 1, hint=">= 1")
    # A reply topic whose gateway has not marked it alive for this long is deleted by the other
    # gateways' sweep (services/gateway/reply_topics.py); live ones mark it every min(60 s, 1/4).
    reply_topic_max_idle_s: float = env("REPLY_TOPIC_MAX_IDLE_SECONDS", 3600.0, check=lambda v: v >= 1,
                                        hint="seconds >= 1")

    @property
    def max_request_bytes(self) -> int:
        """The largest valid request on the wire: a message of ``max_message_bytes`` plus the
        other fields (ids, sampling with 4 stop strings of 64 characters, a 2 KiB feedback
        comment) well within 8 KiB, plus a seed of ``max_seed_bytes`` and its framing (a few
        bytes per text). The gRPC server refuses anything bigger before parsing."""
        seed = self.max_seed_bytes + 16 * (2 * self.max_seed_exchanges + 1) if self.max_seed_exchanges else 0
        return self.max_message_bytes + seed + REQUEST_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True)
class HistoryStoreConfig(StoreConfig):
    """The conversation store the gateway reads: the materializer's own settings
    (DATABASE_URL or CONVERSATION_DB, CONVERSATION_TOPIC, CONVERSATION_GROUP_ID)."""
