"""Moderation settings from the environment (docs/configuration.md)."""

from __future__ import annotations

import dataclasses

from services.common import topics
from services.common.config import env
from services.moderation import paths

STAGES = {"input", "output"}


@dataclasses.dataclass(frozen=True)
class ModerationConfig:
    # Which Kafka stages this process runs: "input,output" (default), one of them, or "" (gRPC only).
    stages: list[str] = env("MODERATION_STAGES", ["input", "output"], check=lambda v: set(v) <= STAGES,
                            hint="a comma-separated subset of input,output (empty: gRPC only)")
    policy_file: str = env("MODERATION_POLICY", str(paths.POLICY_FILE))
    classifier_file: str = env("MODERATION_CLASSIFIER", str(paths.CLASSIFIER_FILE))
    # Empty: ${COLLOQUY_CACHE:-~/.cache/colloquy}/moderation/minilm-l6-v2-onnx (built by `build`).
    model_dir: str = env("MODERATION_MODEL_DIR", "")
    # Which encoder build runs: int8 (default, what the committed heads were trained on) or fp32.
    precision: str = env("MODERATION_PRECISION", "int8", check=lambda v: v in {"int8", "fp32"},
                         hint="int8 or fp32")
    # Windows embedded at once, each run on one core (embedder.py). Not ONNX Runtime intra-op
    # threads: those spin while waiting, and on cores shared with the other stages a batch of 16
    # took 3x the wall time with one per core (41.3 vs 12.5 ms/text p50, session 2's eval).
    threads: int = env("MODERATION_THREADS", 0, check=lambda v: 0 <= v <= 64,
                       hint="windows embedded at once, 0 = one per core")
    # Output moderation releases answer text in chunks of about this many characters.
    chunk_min_chars: int = env("MODERATION_CHUNK_MIN_CHARS", 64, check=lambda v: 1 <= v <= 4096,
                               hint="1..4096 characters")
    chunk_max_chars: int = env("MODERATION_CHUNK_MAX_CHARS", 200, check=lambda v: 1 <= v <= 8192,
                               hint="1..8192 characters, >= MODERATION_CHUNK_MIN_CHARS")
    # The first chunk is shorter (streaming.py): the time to the first text a person sees in hold
    # mode. 4 ends at the first word break past 4 characters (usually the first word or two):
    # against 24, benign answers cut by output moderation 11 -> 8 of 203 (8: 9, the same ones plus
    # one), harmful ones 11 of 12 at every first length with the round-2 classifier (round 3's: 4
    # and 24 cut 2 and 4 of 203, harmful 10 of 12; bench/results/output_chunks.json); 1 chat
    # hold overhead 230.6 (24) -> 103-110 (8) -> 84.4 ms p50 (bench/results/pipeline.md). 0: like
    # the other chunks.
    chunk_first_chars: int = env("MODERATION_CHUNK_FIRST_CHARS", 4, check=lambda v: 0 <= v <= 4096,
                                 hint="0..4096 characters (0: like the other chunks)")
    # The hidden instructions output moderation checks answers against (every version's `before`
    # and `after`): the prompt service's file. Set it too when PROMPT_TEMPLATES_FILE is changed.
    templates_file: str = env("MODERATION_TEMPLATES_FILE", str(paths.TEMPLATES_FILE))
    # The input stage reads the gateway's requests; "chat.tokenized" when the tokenizer stage runs in
    # front of it (TOKENIZER_TOPIC_OUT, services/tokenizer/worker.py).
    input_topic_in: str = env("MODERATION_INPUT_TOPIC_IN", topics.CHAT_REQUESTS.name)
    input_group: str = env("MODERATION_INPUT_GROUP", "colloquy-moderation-input")
    output_group: str = env("MODERATION_OUTPUT_GROUP", "colloquy-moderation-output")
    max_inputs: int = env("MODERATION_MAX_INPUTS", 32, check=lambda v: 1 <= v <= 1024, hint="1..1024")
    max_input_bytes: int = env("MODERATION_MAX_INPUT_BYTES", 32 * 1024, check=lambda v: v >= 1,
                               hint="bytes >= 1")
