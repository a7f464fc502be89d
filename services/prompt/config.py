"""Prompt service configuration (environment variables; docs/configuration.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common import topics
from services.common.config import env, positive
from services.common.sampling import SLOT_TOKENS_DEFAULT, SLOT_TOKENS_ENV
from services.conversation.config import StoreConfig

DEFAULTS = {"GRPC_PORT": "50054", "METRICS_PORT": "9104"}
DEFAULT_TEMPLATES = str(Path(__file__).with_name("templates.yaml"))


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    # The model's tokenizer (see services.tokenizer.model_files): prompts are counted with the
    # exact tokenizer the served model reads.
    tokenizer_path: str = env("TOKENIZER_PATH", "")
    templates_file: str = env("PROMPT_TEMPLATES_FILE", DEFAULT_TEMPLATES)
    # 0: the model's genai_config.json model.context_length (8192 for SmolLM2-135M) or 8192.
    context_tokens: int = env("MODEL_CONTEXT_TOKENS", 0, check=lambda v: 0 <= v <= 1 << 20,
                              hint="0 (from the model) or a token count")
    # Generation's KV slot (prompt + answer; the same variable generation reads): prompts are
    # assembled within min(context, slot), or generation would refuse every turn of a long chat.
    slot_tokens: int = env(SLOT_TOKENS_ENV, SLOT_TOKENS_DEFAULT, check=lambda v: 16 <= v <= 1 << 20,
                           hint="16..1048576")
    max_message_bytes: int = env("PROMPT_MAX_MESSAGE_BYTES", 8192, check=lambda v: 1 <= v <= 1 << 20,
                                 hint="1..1048576 bytes")
    # Read-your-writes: how long a turn waits for the history to include everything before it.
    history_wait_s: float = env("HISTORY_WAIT_SECONDS", 10.0, check=positive, hint="seconds > 0")
    # A turn whose answer is never recorded (crash downstream) stops blocking its conversation
    # after its deadline, or after this long when it has none.
    pending_ttl_s: float = env("PENDING_TURN_TTL_SECONDS", 600.0, check=positive, hint="seconds > 0")
    kafka_worker: bool = env("KAFKA_WORKER", True)
    topic_in: str = env("PROMPT_TOPIC_IN", topics.CHAT_MODERATED.name)
    topic_out: str = env("PROMPT_TOPIC_OUT", topics.CHAT_PROMPTS.name)
    group_id: str = env("PROMPT_GROUP_ID", "colloquy-prompt")


@dataclasses.dataclass(frozen=True)
class HistoryStoreConfig(StoreConfig):
    """The conversation store the prompt stage reads: the materializer's own settings
    (DATABASE_URL or CONVERSATION_DB, CONVERSATION_TOPIC, CONVERSATION_GROUP_ID)."""
