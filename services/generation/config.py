"""Generation service configuration (environment variables; docs/configuration.md).

`EngineSettings` is the engine's one settings class: each knob's name, default, bounds and
variable are declared there and nowhere else, and the engine, the Serve deployment, the Kafka
worker, tests and benchmarks all take it as it is. How a replica gets it (one path): the Serve
application builder (`deployment.build`, run once per deploy of the application) loads it from
the `GENERATION_*` variables and binds it as the deployment's init argument, so every replica of a
deployment is built from that one object and no replica reads the environment. Rollouts change
only the served model version (Serve `user_config`, `rollout.RolloutState`), never these settings.
`ServiceSettings` and `WorkerSettings` are read by `python -m services.generation` (Ray + Serve,
and the Kafka worker).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common import topics
from services.common.config import env, positive, validate
from services.common.sampling import SLOT_TOKENS_DEFAULT, SLOT_TOKENS_ENV

DEFAULTS = {"METRICS_PORT": "9105"}
DEFAULT_SERVE_CONFIG = str(Path(__file__).with_name("serve_config.yaml"))


def _nonneg(v: int) -> bool:
    return v >= 0


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The engine's knobs (one engine per Serve replica); checked when built (`validate`)."""

    # A model directory (genai_config.json, model.onnx, tokenizer); empty: the model registry's
    # current version of the "generation" deployment.
    model_dir: str = env("GENERATION_MODEL_DIR", "")
    # Version label reported with every answer; empty: the registry's, else the directory name.
    model_version: str = env("GENERATION_MODEL_VERSION", "")
    provider: str = env("GENERATION_PROVIDER", "auto", check=lambda v: v in {"auto", "cuda", "cpu"},
                        hint="auto, cuda or cpu")
    # The batch: a replica's aggregate keeps rising up to 16 streams (through the deployment
    # 60 -> 178 tok/s, 2.97x, at ITL p50 66 ms; bench/results/engine.md), so 16 by default.
    max_running: int = env("GENERATION_MAX_RUNNING", 16, check=lambda v: 1 <= v <= 256, hint="1..256")
    max_waiting: int = env("GENERATION_MAX_WAITING", 32, check=lambda v: 0 <= v <= 10000, hint="0..10000")
    prefill_chunk: int = env("GENERATION_PREFILL_CHUNK", 64, check=lambda v: 1 <= v <= 65536,
                             hint="1..65536 tokens")
    # KV positions per slot (prompt + answer): memory is (max_running + 1) x this x the model's
    # KV bytes per token (46 KB for SmolLM2-135M, fp32 cache): 1.6 GB at 16 x 2048, allocated
    # in full on a GPU; on CPU the pages are mapped lazily, so only positions in use are resident.
    # The prompt stage reads the same setting (services.common.sampling) to fit prompts inside it.
    slot_tokens: int = env(SLOT_TOKENS_ENV, SLOT_TOKENS_DEFAULT, check=lambda v: 16 <= v <= 1 << 20,
                           hint="16..1048576")
    # Prompt tokens waiting for their prefill beyond which new requests get RESOURCE_EXHAUSTED.
    max_queued_prompt_tokens: int = env("GENERATION_MAX_QUEUED_PROMPT_TOKENS", 65536, check=lambda v: v >= 1,
                                        hint="tokens >= 1")
    # The prefix cache (prompt KV by 16-token blocks, LRU): on unless CONVERSATIONS is 0; its budget
    # in KV positions (x the model's KV bytes per token); hits shorter than MIN_TOKENS are not used.
    prefix_cache_conversations: int = env("GENERATION_PREFIX_CACHE_CONVERSATIONS", 16,
                                          check=lambda v: 0 <= v <= 100000, hint="0..100000")
    prefix_cache_tokens: int = env("GENERATION_PREFIX_CACHE_TOKENS", 32768, check=_nonneg, hint="tokens >= 0")
    prefix_cache_min_tokens: int = env("GENERATION_PREFIX_CACHE_MIN_TOKENS", 32, check=lambda v: v >= 1,
                                       hint="tokens >= 1")
    # Finished answers (n == 1) waiting for a cache fill at most, the oldest dropped first; 0: off.
    # A fill prefills prompt + answer into the prefix cache while no request waits or prefills, so
    # the conversation's next turn finds its last answer cached (scheduler.Fill).
    prefix_cache_answers: int = env("GENERATION_PREFIX_CACHE_ANSWERS", 16, check=lambda v: 0 <= v <= 10000,
                                    hint="0..10000")
    # Passes over at least this many rows (decode) or prompt tokens (a prefill chunk) run on a
    # float32 copy of a block-quantized CPU build's weights (model/float32_copy.py: ONNX Runtime's
    # MatMulNBits re-dequantizes every block on every pass over 2+ rows); one-row passes keep the
    # quantized graph, whose fused kernel is faster there.
    # Costs the weights' float32 size in memory (~0.45 GB for SmolLM2-135M). 0: off.
    float32_rows: int = env("GENERATION_FLOAT32_ROWS", 2, check=lambda v: 0 <= v <= 4096, hint="0 (off) or rows")
    max_tokens_limit: int = env("GENERATION_MAX_TOKENS_LIMIT", 2048, check=lambda v: 1 <= v <= 1 << 20,
                                hint="1..1048576")
    max_n: int = env("GENERATION_MAX_N", 4, check=lambda v: 1 <= v <= 16, hint="1..16")
    # A replica streams at most one message per candidate per interval (tokens are coalesced):
    # fewer Ray objects (and proxy work) per token, at most this much added latency per token.
    stream_interval_ms: float = env("GENERATION_STREAM_INTERVAL_MS", 10.0, check=lambda v: 0 <= v <= 1000,
                                    hint="0..1000 milliseconds")
    # Under load the interval grows: each candidate's is at least (running candidates / this) s, so a
    # replica's streams together send about this many messages per second at most (engine.pace).
    # Every message costs Ray's streaming generator, Serve's proxy and the client about the same
    # CPU whatever it carries, on the model's cores. 1 stream: 10 ms (a message per token, as
    # before); 16: 160 ms, 2-3 tokens per message at ~60 ms steps. 0: off (the interval alone).
    stream_messages_per_s: float = env("GENERATION_STREAM_MESSAGES_PER_S", 100.0,
                                       check=lambda v: v == 0 or 1 <= v <= 100000,
                                       hint="0 (off) or 1..100000 messages per second")
    # A stream's first this many messages keep GENERATION_STREAM_INTERVAL_MS alone, whatever the
    # load: the opening words (and output moderation's first chunk in hold mode) at step speed.
    # Measured at 16 chats through the pipeline: bench/results/pipeline.md. 0: paced from the start.
    stream_opening_messages: int = env("GENERATION_STREAM_OPENING_MESSAGES", 4,
                                       check=lambda v: 0 <= v <= 1000, hint="0..1000 messages")
    # Each replica serves its own /metrics on the first free port from here (several replicas
    # may share a node); 0 disables it.
    replica_metrics_port: int = env("GENERATION_REPLICA_METRICS_PORT", 9110, check=_nonneg,
                                    hint="a TCP port, 0 = off")
    # Set in code only (tests, benchmarks; no variable): one decode pass per batch size at load
    # (Scheduler.warm_up), so no request meets a first-visit stall of ONNX Runtime later.
    warm_up: bool = True
    # The prefix cache's block size in tokens (vLLM's default).
    prefix_cache_block: int = 16
    # ONNX Runtime intra-op threads; 0: one per CPU Ray assigned the replica (deployment.py),
    # ONNX Runtime's own default (one per core) in process.
    threads: int = 0
    # ORT's intra-op threads spin-wait between ops by default: on a small shared CPU that steals
    # the cores the other threads need, and decode got slower, not faster, with spinning.
    spin: bool = False

    def __post_init__(self) -> None:
        validate(self)
        if self.prefix_cache_block < 1 or self.threads < 0:
            raise ValueError(f"prefix_cache_block must be >= 1 and threads >= 0, not {self.prefix_cache_block}"
                             f" and {self.threads}")


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """`python -m services.generation`: local Ray + Serve, and the Kafka worker."""

    serve_config: str = env("GENERATION_SERVE_CONFIG", DEFAULT_SERVE_CONFIG)
    # Empty: start a local Ray instance (sized by the two below); else an existing cluster's address.
    ray_address: str = env("RAY_ADDRESS", "")
    ray_num_cpus: int = env("GENERATION_RAY_NUM_CPUS", 2, check=lambda v: v >= 1, hint="CPUs >= 1")
    ray_object_store_mb: int = env("GENERATION_RAY_OBJECT_STORE_MB", 200, check=lambda v: v >= 80,
                                   hint="MiB >= 80")
    # Deploy the config file; off: the application is deployed by someone else (KubeRay's
    # RayService with RAY_ADDRESS set), and this process only waits for it and runs the worker.
    deploy: bool = env("GENERATION_DEPLOY", True)
    # Port of Serve's gRPC proxy; overrides the config file's grpc_options.port when set.
    grpc_port: int = env("GENERATION_GRPC_PORT", 0, check=_nonneg, hint="a TCP port, 0 = the file's")
    # Run the Kafka bridge; off: only Ray Serve (gRPC ingress and handles) runs.
    kafka_worker: bool = env("KAFKA_WORKER", True)
    app_name: str = env("GENERATION_APP_NAME", "generation")
    deployment_name: str = env("GENERATION_DEPLOYMENT", "generation")


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """The Kafka bridge."""

    topic_in: str = env("GENERATION_TOPIC_IN", topics.CHAT_PROMPTS.name)
    topic_cancels: str = env("GENERATION_TOPIC_CANCELS", topics.CHAT_CANCELS.name)
    topic_out: str = env("GENERATION_TOPIC_OUT", topics.GENERATION_PROGRESS.name)
    group_id: str = env("GENERATION_GROUP_ID", "colloquy-generation")
    # Requests generated concurrently by this worker; beyond it the prompt partitions are paused.
    max_in_flight: int = env("GENERATION_MAX_IN_FLIGHT", 32, check=lambda v: 1 <= v <= 4096,
                             hint="1..4096")
    # A progress batch goes out every this many tokens or this many ms, whichever comes first.
    batch_tokens: int = env("GENERATION_BATCH_TOKENS", 4, check=lambda v: 1 <= v <= 1024, hint="1..1024")
    batch_ms: float = env("GENERATION_BATCH_MS", 20.0, check=positive, hint="milliseconds > 0")
    # A request whose stream breaks (replica died) is regenerated this many times (same seed).
    retries: int = env("GENERATION_RETRIES", 2, check=lambda v: 0 <= v <= 10, hint="0..10")
