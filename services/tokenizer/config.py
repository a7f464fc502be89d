"""Tokenizer service configuration (environment variables; docs/configuration.md)."""

from __future__ import annotations

import dataclasses

from services.common import topics
from services.common.config import env

DEFAULTS = {"GRPC_PORT": "50052", "METRICS_PORT": "9102"}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # A directory with tokenizer.json (or the file itself); empty: the model registry's current
    # "generation" version, so the tokenizer always matches the served model.
    tokenizer_path: str = env("TOKENIZER_PATH", "")
    # Direct-use deployments serve only the gRPC API and need no broker.
    kafka_worker: bool = env("KAFKA_WORKER", True)
    # Overridable so a test (or a canary) can run the stage on its own topics and group.
    topic_in: str = env("TOKENIZER_TOPIC_IN", topics.CHAT_REQUESTS.name)
    # Empty (default): the stage only counts, beside the turn's path (services/tokenizer/worker.py);
    # "chat.tokenized" puts it back in front of input moderation (MODERATION_INPUT_TOPIC_IN too).
    topic_out: str = env("TOKENIZER_TOPIC_OUT", "")
    group_id: str = env("TOKENIZER_GROUP_ID", "colloquy-tokenizer")
