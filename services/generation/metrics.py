"""Prometheus metrics of the generation engine (names as vLLM's, under `colloquy_generation_`).

Dashboards and alert rules (deploy/, k8s/) query these names: rename nothing without them.
TTFT and REQUESTS carry the ``model_version`` that served the request, so a canary can be compared
with the stable version (``rlhf.canary``); the label takes only published version names (the ones
this process loaded), so its cardinality is the handful of versions a replica serves.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
TTFT = Histogram("colloquy_generation_time_to_first_token_seconds",
                 "From submission to the first generated token of a request (queue + prefill), by the "
                 "model version that served it", ["model_version"], buckets=_LAT)
ITL = Histogram("colloquy_generation_inter_token_latency_seconds",
                "Time between two consecutive tokens of one candidate", buckets=_ITL)
E2E = Histogram("colloquy_generation_request_duration_seconds",
                "From submission to the last token of every candidate of a request", buckets=_LAT)
QUEUE = Histogram("colloquy_generation_queue_time_seconds",
                  "From submission until the request's prefill started", buckets=_LAT)
RUNNING = Gauge("colloquy_generation_running_sequences", "Candidates in the running (decoding) batch")
WAITING = Gauge("colloquy_generation_waiting_requests", "Requests waiting for their prefill")
BATCH = Histogram("colloquy_generation_batch_size", "Rows in one decode pass",
                  buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
STEP = Histogram("colloquy_generation_step_seconds", "One scheduler pass, by kind (decode or prefill)",
                 ["kind"], buckets=_ITL)
PROMPT_TOKENS = Counter("colloquy_generation_prompt_tokens_total", "Prompt tokens prefilled")
GENERATED_TOKENS = Counter("colloquy_generation_generated_tokens_total", "Tokens generated")
REQUESTS = Counter("colloquy_generation_requests_total",
                   "Requests finished, by outcome and the model version picked for them",
                   ["outcome", "model_version"])
MODEL_INFO = Gauge("colloquy_generation_model_info", "The model version new requests use (value 1)",
                   ["version", "provider"])
KV_TOKENS = Gauge("colloquy_generation_kv_cache_tokens",
                  "KV positions held: running candidates' and the prefix cache's blocks")
KV_USAGE = Gauge("colloquy_generation_kv_cache_usage_ratio",
                 "Running candidates' KV positions over their slots' capacity (0..1)")
# vLLM counts tokens: queried = prompt tokens looked up, hits = those found in the cache.
PREFIX_QUERIES = Counter("colloquy_generation_prefix_cache_queries_total",
                         "Prompt tokens looked up in the prefix cache")
PREFIX_HITS = Counter("colloquy_generation_prefix_cache_hits_total",
                      "Prompt tokens whose KV came from the prefix cache (not prefilled)")
PREFIX_LOOKUPS = Counter("colloquy_generation_prefix_cache_lookups_total",
                         "Requests by prefix-cache result (hit: some KV reused)", ["result"])
PREFIX_REUSED_TOKENS = Counter("colloquy_generation_prefix_cache_reused_tokens_total",
                               "Prompt tokens not prefilled because the prefix cache held them")
PREFIX_EVICTIONS = Counter("colloquy_generation_prefix_cache_evictions_total",
                           "Prefix-cache blocks dropped, by reason", ["reason"])
PREFIX_TOKENS = Gauge("colloquy_generation_prefix_cache_tokens", "KV positions held by the prefix cache")
PREFIX_BYTES = Gauge("colloquy_generation_prefix_cache_bytes", "Bytes held by the prefix cache")
PREFIX_FILLS = Counter("colloquy_generation_prefix_cache_fills_total",
                       "Cache fills of finished answers, by outcome (done; dropped: the queue's bound, the "
                       "cache off, retired or too small, or the engine closing)", ["outcome"])
PREFIX_FILL_TOKENS = Counter("colloquy_generation_prefix_cache_fill_tokens_total",
                             "Tokens prefilled by cache fills (prompt + answer positions not cached yet)")
