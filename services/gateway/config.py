"""Gateway configuration (environment variables; see the README's table)."""

from __future__ import annotations

import dataclasses

from services.common.config import env, positive

DEFAULTS = {"GRPC_PORT": "50051", "METRICS_PORT": "9101"}


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    api_keys_file: str = env("API_KEYS_FILE", "deploy/dev/api-keys.yaml")
    max_message_bytes: int = env("CHAT_MAX_MESSAGE_BYTES", 8192, check=lambda v: 1 <= v <= 1 << 20,
                                 hint="1..1048576 bytes")
    max_tokens_limit: int = env("CHAT_MAX_TOKENS_LIMIT", 1024, check=lambda v: 1 <= v <= 8192,
                                hint="1..8192")
    default_max_tokens: int = env("CHAT_DEFAULT_MAX_TOKENS", 256, check=lambda v: v >= 1, hint=">= 1")
    max_n: int = env("CHAT_MAX_N", 4, check=lambda v: 1 <= v <= 8, hint="1..8")
    default_deadline_s: float = env("CHAT_DEFAULT_DEADLINE_SECONDS", 120.0, check=positive,
                                    hint="seconds > 0")
    max_concurrent_chats: int = env("CHAT_MAX_CONCURRENT", 64, check=lambda v: v >= 1, hint=">= 1")
    reply_idle_timeout_s: float = env("CHAT_REPLY_IDLE_TIMEOUT_SECONDS", 60.0, check=positive,
                                      hint="seconds > 0")
