"""Continuous-batching text generation over ONNX Runtime GenAI, with no Ray and no gRPC.

Like vLLM's engine is separate from its entrypoints, this module only knows prompts, sampling
options and tokens; `deployment.py` puts it behind Ray Serve and gRPC, `worker.py` behind Kafka.

How it batches. One scheduler thread owns every ONNX Runtime GenAI object that decodes. Each
request is one `og.Generator` whose batch rows are its n candidates (one forward pass for all of
them, one seed, so the same request gives the same n answers); every scheduler *round* admits
waiting requests into free slots (a new request joins the running batch), runs one decode step of
every running request (or one prefill chunk of a new single-candidate one, so a long prompt never
stalls the others for more than a chunk; ORT GenAI takes a multi-row prompt in one piece), and
retires finished requests (a finished one leaves the batch). Cancellation and deadlines are
checked before every step of every request, so a request stops within one decode step.

Why Generators stepped round-robin and not `og.Engine` (0.18): on the CPU provider the Engine only
offers its *static* batch (dynamic batching needs a PagedAttention model, which the builder makes
for CUDA fp16/bf16 only); in that mode it refuses per-request seeds and stop strings
("... requires an Engine configured for dynamic batching"), so it cannot give the reproducible,
per-request answers the pipeline needs, and on this 2-core CPU it was also slower per stream (see
the numbers in `services/generation/README.md`, measured by `python -m services.generation.measure`).
On a GPU with a paged build, the Engine (dynamic batching, per-turn seeds, stop strings, KV reuse
across turns) is the natural next backend behind this same interface.

Conversation KV reuse (prefix cache). A finished single-candidate request that names a conversation
leaves its Generator (its KV cache and the token ids it holds) in a bounded per-engine LRU
(`EngineConfig.prefix_cache_*`: at most so many conversations and so many allocated KV positions).
The next turn of that conversation on the same model takes it back, `rewind_to`s the longest
common prefix of the kept ids and its own prompt ids (within the kept turn's prompt: see
`_resume` for why decoded positions are not reused), and prefills only the rest; a prefix shorter
than `prefix_cache_min_tokens`, a Generator too small for prompt + max_tokens, or another model
version starts fresh. The router sends a conversation's turns to one replica (consistent hash on
the conversation id), so the cache is where the next turn lands. On the CPU provider
(`past_present_share_buffer`) a Generator allocates its whole `max_length` of KV up front and cannot
grow, so a conversation's Generator is created with room to spare (`prefix_cache_reserve_tokens`,
at least doubling), and outgrowing it costs one full prefill.

Sampling stays reproducible with reuse: single-candidate Generators are all created greedy (search
options cannot change after creation, and a kept Generator's random stream would continue where the
previous turn left it), and the engine samples a sampled request's tokens itself from the logits
(temperature, the model's top_k, top_p) with a NumPy generator seeded like before. So an answer
depends only on the prompt ids, the sampling options and the seed, whether its prefix came from
the cache or not, and a redelivered request still gets the same answer. Multi-candidate requests
keep ORT GenAI's own batched sampling and are never cached.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.generation import rollout

log = logging.getLogger(__name__)

# -- metrics -------------------------------------------------------------------------------------
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
TTFT = Histogram("colloquy_generation_time_to_first_token_seconds",
                 "From submission to the first generated token of a request (queue + prefill)",
                 buckets=_LAT)
ITL = Histogram("colloquy_generation_inter_token_latency_seconds",
                "Time between two consecutive tokens of one candidate", buckets=_ITL)
E2E = Histogram("colloquy_generation_request_duration_seconds",
                "From submission to the last token of every candidate of a request", buckets=_LAT)
QUEUE = Histogram("colloquy_generation_queue_time_seconds",
                  "From submission until the request's candidates joined the running batch",
                  buckets=_LAT)
RUNNING = Gauge("colloquy_generation_running_sequences", "Candidates in the running batch")
WAITING = Gauge("colloquy_generation_waiting_requests", "Requests waiting for a batch slot")
BATCH = Histogram("colloquy_generation_batch_size", "Candidates stepped in one scheduler round",
                  buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
PROMPT_TOKENS = Counter("colloquy_generation_prompt_tokens_total", "Prompt tokens prefilled")
GENERATED_TOKENS = Counter("colloquy_generation_generated_tokens_total", "Tokens generated")
REQUESTS = Counter("colloquy_generation_requests_total", "Requests finished, by outcome", ["outcome"])
MODEL_INFO = Gauge("colloquy_generation_model_info", "The model version new requests use (value 1)",
                   ["version", "provider"])
# ORT GenAI sizes no shared block pool on CPU (each Generator holds its own cache), so "use" is the
# token positions the running requests hold (prompt + generated, per row) over max_running x context.
KV_TOKENS = Gauge("colloquy_generation_kv_cache_tokens",
                  "Token positions held in KV caches: running requests' and conversations kept between turns")
KV_USAGE = Gauge("colloquy_generation_kv_cache_usage_ratio",
                 "kv_cache_tokens over max_running x context_length + prefix_cache_max_tokens (0..1)")
# Conversation KV reuse between turns (the prefix cache; see the module docstring).
PREFIX_LOOKUPS = Counter("colloquy_generation_prefix_cache_lookups_total",
                         "Single-candidate conversation requests by prefix-cache result (hit: a kept KV "
                         "cache was continued; miss: prefilled from scratch)", ["result"])
PREFIX_REUSED_TOKENS = Counter("colloquy_generation_prefix_cache_reused_tokens_total",
                               "Prompt tokens not prefilled because a kept KV cache already held them")
PREFIX_EVICTIONS = Counter("colloquy_generation_prefix_cache_evictions_total",
                           "Kept conversation KV caches dropped, by reason", ["reason"])
PREFIX_CONVERSATIONS = Gauge("colloquy_generation_prefix_cache_conversations",
                             "Conversations whose KV cache is kept between turns")
PREFIX_TOKENS = Gauge("colloquy_generation_prefix_cache_tokens",
                      "KV positions allocated by the kept conversation caches (their max_length)")


# -- public types --------------------------------------------------------------------------------
class FinishReason(enum.Enum):
    """Why a candidate stopped; names match `colloquy.v1.FinishReason` without the prefix."""

    STOP = "STOP"  # end-of-turn token or a stop string
    LENGTH = "LENGTH"  # max_tokens or the context length
    CANCELLED = "CANCELLED"  # cancel() or the deadline passed
    ERROR = "ERROR"  # the runtime failed on this candidate


class EngineError(Exception):
    """Base of the errors `submit` raises before anything is generated."""


class Overloaded(EngineError):
    """Running batch and waiting queue are full (gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(EngineError):
    """The request's deadline had already passed when it arrived (gRPC DEADLINE_EXCEEDED)."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot be served as asked (gRPC INVALID_ARGUMENT); `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineClosed(EngineError):
    """The engine is shutting down (gRPC UNAVAILABLE)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-request sampling options (validated by the caller; the engine clamps to the context)."""

    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: derived from the request id, so a retry gives the same answer
    n: int = 1


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to continue."""

    request_id: str
    prompt: str
    sampling: Sampling = Sampling()
    deadline_unix_ms: int = 0  # absolute wall-clock deadline; 0 = none
    conversation_id: str = ""


@dataclasses.dataclass(frozen=True)
class Delta:
    """New output of one candidate since its previous delta."""

    index: int
    text: str
    tokens: int  # tokens generated in this delta
    finish_reason: FinishReason | None  # set on the candidate's last delta
    model_version: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated by this candidate so far
    error: str = ""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacity and scheduling knobs."""

    max_running: int = 8  # candidates decoding at once (the batch)
    max_waiting: int = 32  # requests queued for a slot beyond that; more raise Overloaded
    prefill_chunk: int = 256  # prompt tokens one candidate prefills per round
    provider: str = "auto"  # "auto" (CUDA when a GPU is present), "cuda" or "cpu"
    # Conversation KV reuse between turns: at most this many conversations kept (0 = off) ...
    prefix_cache_conversations: int = 16
    # ... holding at most this many allocated KV positions together (a kept Generator holds its
    # whole max_length: about 44 KiB per position for SmolLM2-135M with an fp32 cache) ...
    prefix_cache_max_tokens: int = 32768
    # ... reused only when the common prefix is at least this long ...
    prefix_cache_min_tokens: int = 32
    # ... and a conversation's Generator gets room for this many positions beyond prompt +
    # max_tokens (at least as many again as those), so later turns fit without a fresh prefill.
    prefix_cache_reserve_tokens: int = 1024


def seed_for(request_id: str, seed: int | None, index: int) -> int:
    """The sampling seed of candidate `index`: given, or derived from the request id.

    ORT GenAI's `random_seed` is a 31-bit non-negative int (-1 means random), hence the modulus.
    """
    base = seed if seed is not None else int.from_bytes(
        hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return (base + index) % 2_147_483_647


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports; 0 without a driver.

    `og.is_cuda_available()` only says the CUDA build is installed (True on this CPU-only
    machine), so ask the driver itself.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def resolve_provider(requested: str) -> str:
    """"auto" -> "cuda" when a GPU is present, else "cpu"; explicit values pass through."""
    requested = (requested or "auto").lower()
    if requested not in {"auto", "cuda", "cpu"}:
        raise ValueError(f"provider must be auto, cuda or cpu, not {requested!r}")
    if requested != "auto":
        return requested
    return "cuda" if cuda_device_count() > 0 else "cpu"


class LoadedModel:
    """One model version: the ORT GenAI model, its tokenizer and what the scheduler needs to know."""

    def __init__(self, path: str | Path, version: str, provider: str = "auto") -> None:
        import onnxruntime_genai as og

        self.path = Path(path)
        self.version = version
        self.provider = resolve_provider(provider)
        config = og.Config(str(self.path))
        config.clear_providers()  # a CUDA-targeted build still loads on a CPU-only machine
        if self.provider == "cuda":
            config.append_provider("cuda")
        started = time.perf_counter()
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        doc = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))
        self.context_length = int(doc["model"].get("context_length") or doc["search"]["max_length"])
        # ORT GenAI samples from the model's own top_k (50 for SmolLM2, as in HF); so does the engine.
        self.top_k = int(doc["search"].get("top_k", 50) or 0)
        log.info("model loaded", extra={"model_version": version, "path": str(self.path),
                                        "provider": self.provider, "context_length": self.context_length,
                                        "load_s": round(time.perf_counter() - started, 3)})

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]


# -- internals -----------------------------------------------------------------------------------
def sample_token(logits: np.ndarray, temperature: float, top_p: float, top_k: int,
                 rng: np.random.Generator) -> int:
    """One token drawn from `logits` (one row): temperature, then top_k, then top_p (nucleus)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    idx = np.argpartition(z, -top_k)[-top_k:] if 0 < top_k < z.size else np.arange(z.size)
    v = z[idx] / temperature
    order = np.argsort(-v, kind="stable")
    idx, v = idx[order], v[order]
    p = np.exp(v - v[0])
    p /= p.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        idx, p = idx[:cut], p[:cut] / p[:cut].sum()
    return int(idx[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), len(idx) - 1)])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n], dtype=np.int64), np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


@dataclasses.dataclass
class _Kept:
    """A finished conversation turn's Generator, kept for the conversation's next turn."""

    gen: Any
    model: LoadedModel
    ids: list[int]  # the Generator's sequence: its prompt, then what it generated
    prefilled: int  # the first this many ids went in as prompt (their KV is reused, not the rest's)
    capacity: int  # the max_length it was created with: the KV positions it holds allocated


class _StopMatcher:
    """Incremental stop-string search that never releases text a stop string might start with."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched). Text from the match on is dropped."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class _Seq:
    """One candidate answer being decoded."""

    def __init__(self, req: _Req, index: int) -> None:
        self.req = req
        self.index = index
        self.stream: Any = None  # the tokenizer's incremental detokenizer for this row
        self.tokens = 0
        self.unreported_tokens = 0
        self.unreported_text = ""
        self.stops = _StopMatcher(req.request.sampling.stop)
        self.finish: FinishReason | None = None
        self.error = ""
        self.reported_finish = False
        self.last_token_at = 0.0


class _Req:
    """A submitted request and its candidates; the bridge to the caller's event loop."""

    def __init__(self, request: Request, model: LoadedModel, prompt_ids: list[int],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.model = model
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue: asyncio.Queue[tuple[list[Delta], bool]] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at = 0.0
        self.seqs = [_Seq(self, i) for i in range(request.sampling.n)]
        self.gen: Any = None  # one og.Generator whose batch rows are the candidates
        self.capacity = 0  # its max_length
        self.prefilled = 0
        self.reused = 0  # prompt tokens whose KV came from the conversation's kept Generator
        self.rng: np.random.Generator | None = None  # set: the engine samples (n == 1, temperature > 0)
        self.pending: int | None = None  # a token the engine sampled, to append before the next step
        self.done = False

    def deadline_passed(self) -> bool:
        d = self.request.deadline_unix_ms
        return bool(d) and time.time() * 1000 > d


class Stream:
    """A submitted request: iterate it for batches of deltas; `cancel()` stops it within a step."""

    def __init__(self, engine: AsyncEngine, req: _Req) -> None:
        self._engine = engine
        self._req = req
        self.request_id = req.request.request_id
        self.prompt_tokens = len(req.prompt_ids)
        self.model_version = req.model.version
        self.first_token_unix_ms = 0
        # Callers across a network (Serve) set this: at most one batch per interval, so a fast
        # model sends fewer, larger messages, and the relay spends its time waiting, not copying.
        self.min_interval_s = 0.0

    def cancel(self) -> None:
        self._req.cancelled = True
        self._engine._wake()

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        """Yield the deltas ready at each moment (one or more per candidate) until all finished."""
        finished = False
        queue = self._req.queue
        try:
            while True:
                deltas, done = await queue.get()
                while not done and not queue.empty():  # a slow consumer gets fewer, larger batches
                    more, done = queue.get_nowait()
                    deltas = merge(deltas + more)
                if deltas and not self.first_token_unix_ms and any(d.tokens for d in deltas):
                    self.first_token_unix_ms = int(time.time() * 1000)
                if deltas:
                    sent = time.monotonic()
                    yield deltas
                    if not done and self.min_interval_s > 0:
                        await asyncio.sleep(self.min_interval_s - (time.monotonic() - sent))
                if done:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client gone, task cancelled): stop decoding
                self.cancel()


def merge(deltas: Sequence[Delta]) -> list[Delta]:
    """Coalesce consecutive deltas of each candidate into one (text joined, tokens summed)."""
    by_index: dict[int, Delta] = {}
    for d in deltas:
        prev = by_index.get(d.index)
        by_index[d.index] = d if prev is None else dataclasses.replace(
            d, text=prev.text + d.text, tokens=prev.tokens + d.tokens,
            finish_reason=d.finish_reason or prev.finish_reason, error=d.error or prev.error)
    return list(by_index.values())


class AsyncEngine:
    """The engine: `submit()` from an asyncio loop, iterate the returned `Stream`."""

    def __init__(self, model_dir: str | Path, version: str, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        c = self.config
        if (c.max_running < 1 or c.max_waiting < 0 or c.prefill_chunk < 1 or c.prefix_cache_conversations < 0
                or c.prefix_cache_max_tokens < 0 or c.prefix_cache_min_tokens < 1
                or c.prefix_cache_reserve_tokens < 0):
            raise ValueError(f"invalid engine config {self.config}")
        self._model = LoadedModel(model_dir, version, self.config.provider)
        self._canary: LoadedModel | None = None  # a second version for a share of conversations
        self._canary_percent = 0
        self.provider = self._model.provider
        MODEL_INFO.labels(version, self.provider).set(1)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting: collections.deque[_Req] = collections.deque()
        self._running: list[_Seq] = []
        self._by_id: dict[str, list[_Req]] = {}
        # conversation id -> its last turn's Generator, least recently used first (under _lock)
        self._kept: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._kept_capacity = 0  # sum of the kept Generators' max_length
        self._running_held = 0  # token positions of the running requests (last round)
        self._closed = False
        self.loop_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop_guarded, name="generation-engine", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """The version new requests are served by."""
        return self._model.version

    @property
    def context_length(self) -> int:
        return self._model.context_length

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "model_version": self._model.version, "provider": self.provider,
                    "canary_version": self._canary.version if self._canary else "",
                    "canary_percent": self._canary_percent,
                    "max_running": self.config.max_running, "max_waiting": self.config.max_waiting,
                    "prefix_cache_conversations": len(self._kept),
                    "prefix_cache_tokens": self._kept_capacity}

    def submit(self, request: Request) -> Stream:
        """Queue `request`; raises Overloaded, DeadlineExceeded, InvalidRequest or EngineClosed."""
        if self._closed:
            raise EngineClosed("the generation engine is shutting down")
        n = request.sampling.n
        if not 1 <= n <= self.config.max_running:
            raise InvalidRequest("sampling.n", f"{n} is outside [1, {self.config.max_running}]")
        if request.deadline_unix_ms and time.time() * 1000 > request.deadline_unix_ms:
            raise DeadlineExceeded("the request's deadline passed before generation started")
        model = self._pick(request)
        ids = model.encode(request.prompt)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(ids) >= model.context_length:
            raise InvalidRequest("prompt", f"{len(ids)} tokens, but the model's context is "
                                           f"{model.context_length} tokens")
        req = _Req(request, model, ids, asyncio.get_running_loop())
        with self._cv:
            # Waiting requests that fit the free slots are about to run (FIFO); the rest really wait.
            free, queued = self.config.max_running - len(self._running), 0
            for r in self._waiting:
                if not queued and r.request.sampling.n <= free:
                    free -= r.request.sampling.n
                else:
                    queued += 1
            if (queued or n > free) and queued >= self.config.max_waiting:
                REQUESTS.labels("overloaded").inc()
                raise Overloaded(f"generation is at capacity ({len(self._running)} candidates running, "
                                 f"{queued} requests waiting); retry later")
            self._waiting.append(req)
            self._by_id.setdefault(request.request_id, []).append(req)
            WAITING.set(len(self._waiting))
            self._cv.notify()
        return Stream(self, req)

    async def generate(self, request: Request) -> AsyncIterator[list[Delta]]:
        """submit() and iterate, for callers that need no handle on the stream."""
        async for deltas in self.submit(request):
            yield deltas

    def cancel(self, request_id: str) -> bool:
        """Stop every in-flight request with this id within one decode step; False if none."""
        with self._lock:
            reqs = list(self._by_id.get(request_id, ()))
        for req in reqs:
            req.cancelled = True
        self._wake()
        return bool(reqs)

    def _pick(self, request: Request) -> LoadedModel:
        """The canary for its share of conversations (by a stable hash), else the stable model."""
        canary, percent = self._canary, self._canary_percent
        if canary is not None and rollout.bucket(request.conversation_id or request.request_id) < percent:
            return canary
        return self._model

    async def set_canary(self, path: str | Path | None, version: str, percent: int) -> None:
        """Serve `version` to `percent`% of conversations (None/0: no canary). In-flight requests
        keep the model they started on."""
        if path is None and percent > 0 and self._canary is not None and self._canary.version == version:
            self._canary_percent = percent  # re-weight the canary already loaded
            return
        if path is None or percent <= 0:
            old, self._canary, self._canary_percent = self._canary, None, 0
            if old is not None and old.version != self._model.version:
                with contextlib.suppress(KeyError):
                    MODEL_INFO.remove(old.version, old.provider)
            if old is not None:
                self._drop_kept("model", lambda k: k.model is old)
            return
        current = self._canary
        if current is None or current.version != version or current.path != Path(path):
            loaded = await asyncio.to_thread(LoadedModel, path, version, self.config.provider)
            self._canary = loaded
            MODEL_INFO.labels(version, loaded.provider).set(1)
            if current is not None:
                self._drop_kept("model", lambda k: k.model is current)
        self._canary_percent = percent
        log.info("canary set", extra={"canary_version": version, "canary_percent": percent,
                                      "stable_version": self._model.version})

    async def load_version(self, path: str | Path, version: str) -> None:
        """Load another model version; new requests use it, in-flight ones finish on the old one."""
        if version == self._model.version and Path(path) == self._model.path:
            return
        loaded = await asyncio.to_thread(LoadedModel, path, version, self.config.provider)
        old = self._model
        self._model = loaded  # one reference swap: submit() binds a request to one model
        MODEL_INFO.labels(version, loaded.provider).set(1)
        self._drop_kept("model", lambda k: k.model is old)
        if old.version != version:
            with contextlib.suppress(KeyError):
                MODEL_INFO.remove(old.version, old.provider)
        log.info("model version switched", extra={"from_version": old.version, "to_version": version})

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for `grace_s`, cancel the rest, stop."""
        self._closed = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running and not self._waiting:
                    break
            await asyncio.sleep(0.05)
        with self._lock:
            for reqs in self._by_id.values():
                for req in reqs:
                    req.cancelled = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 10)
        self._drop_kept("close", lambda k: True)

    # -- scheduler thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced through stats/health; never silently hang callers
            self.loop_error = exc
            log.exception("generation scheduler crashed")
            with self._lock:
                reqs = [r for rs in self._by_id.values() for r in rs]
            for req in reqs:
                for seq in req.seqs:
                    if seq.finish is None:
                        seq.finish, seq.error = FinishReason.ERROR, f"engine crashed: {exc!r}"
                self._publish(req)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._running and not self._waiting:
                    if self._closed:
                        return
                    self._cv.wait(0.5)
            self._admit()
            if self._running:
                self._round()

    def _admit(self) -> None:
        """Move waiting requests into free slots (FIFO); drop cancelled or expired ones."""
        while True:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting[0]
                dead = req.cancelled or req.deadline_passed()
                if not dead and len(self._running) + req.request.sampling.n > self.config.max_running:
                    break
                self._waiting.popleft()
                WAITING.set(len(self._waiting))
            QUEUE.observe(time.perf_counter() - req.submitted)
            if dead:
                for seq in req.seqs:
                    seq.finish = FinishReason.CANCELLED
                self._publish(req)
                continue
            try:
                self._start(req)
            except Exception as exc:
                log.exception("could not start a request", extra={"request_id": req.request.request_id})
                for seq in req.seqs:
                    seq.finish, seq.error = FinishReason.ERROR, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._running.extend(s for s in req.seqs if s.finish is None)
                RUNNING.set(len(self._running))
            if all(s.finish is not None for s in req.seqs):
                self._publish(req)

    def _start(self, req: _Req) -> None:
        import onnxruntime_genai as og

        s, model = req.request.sampling, req.model
        seed = seed_for(req.request.request_id, s.seed, 0)
        needed = min(len(req.prompt_ids) + max(1, s.max_tokens), model.context_length)
        for seq in req.seqs:
            seq.stream = model.tokenizer.create_stream()
        if s.n == 1 and s.temperature > 0:
            req.rng = np.random.default_rng(seed)  # the engine samples; the Generator stays greedy
        conversation = req.request.conversation_id if s.n == 1 and self._cache_on() else ""
        if conversation:
            if self._resume(req, conversation, needed):
                return
            # Room for the next turns: a CPU Generator cannot grow its KV cache.
            needed = min(model.context_length, needed + max(self.config.prefix_cache_reserve_tokens, needed))
        params = og.GeneratorParams(model.model)
        options: dict[str, Any] = {"max_length": needed, "min_length": 0, "num_beams": 1,
                                   "batch_size": s.n, "random_seed": seed}
        if s.temperature > 0 and s.n > 1:
            # top_k stays the model's own (genai_config search.top_k, 50 for SmolLM2, as in HF):
            # top_k=0 with top_p=1 takes ORT GenAI's full-vocabulary sampling path, ~40% slower here.
            options.update(do_sample=True, temperature=float(s.temperature), top_p=float(s.top_p))
        else:
            options["do_sample"] = False
        params.set_search_options(**options)
        req.gen = og.Generator(model.model, params)
        req.capacity = needed

    # -- prefix cache (conversation KV reuse) ---------------------------------------------------
    def _cache_on(self) -> bool:
        c = self.config
        return c.prefix_cache_conversations > 0 and c.prefix_cache_max_tokens > 0

    def _resume(self, req: _Req, conversation: str, needed: int) -> bool:
        """Continue the conversation's kept Generator if it pays; False: start fresh (it is dropped)."""
        with self._lock:
            kept = self._kept.pop(conversation, None)
            if kept is not None:
                self._kept_capacity -= kept.capacity
        if kept is None:
            PREFIX_LOOKUPS.labels("miss").inc()
            return False
        # Only the kept turn's *prompt* positions are reused, and at least two prompt tokens are
        # appended: on the CPU provider the int4 MatMul takes another code path for a single row,
        # and KV computed one token at a time (decode) differs in the last bits from the same
        # positions prefilled (logits moved by up to 0.5 on SmolLM2), which can flip a greedy
        # choice; multi-row prefills of any split are bit-identical. So a reused turn gives exactly
        # a fresh turn's tokens. Costs nothing with the prompt service's templates: the hidden
        # reminder on the newest user message ends the common prefix inside the previous prompt.
        lcp = min(common_prefix(kept.ids, req.prompt_ids), kept.prefilled, len(req.prompt_ids) - 2)
        reason = ("model" if kept.model is not req.model else
                  "short_prefix" if lcp < self.config.prefix_cache_min_tokens else
                  "too_small" if kept.capacity < needed else "")
        if not reason:
            try:
                kept.gen.rewind_to(lcp)
            except Exception:
                log.exception("rewinding a kept generator failed", extra={"request_id": req.request.request_id})
                reason = "error"
        self._gauge_kept()
        if reason:
            PREFIX_EVICTIONS.labels(reason).inc()
            PREFIX_LOOKUPS.labels("miss").inc()
            return False
        req.gen, req.capacity, req.prefilled, req.reused = kept.gen, kept.capacity, lcp, lcp
        PREFIX_LOOKUPS.labels("hit").inc()
        PREFIX_REUSED_TOKENS.inc(lcp)
        return True

    def _keep(self, req: _Req) -> None:
        """Keep a finished conversation turn's Generator for the next turn (LRU, bounded)."""
        gen, req.gen = req.gen, None
        conversation = req.request.conversation_id
        if (not conversation or len(req.seqs) != 1 or not self._cache_on() or req.capacity <= 0
                or req.capacity > self.config.prefix_cache_max_tokens or req.prefilled < 2
                or any(s.finish is FinishReason.ERROR for s in req.seqs)):
            return
        try:
            if gen.is_done():
                return  # full: the next turn cannot fit anyway
            ids = [int(t) for t in gen.get_sequence(0)]
        except Exception:
            log.exception("reading a finished generator failed", extra={"request_id": req.request.request_id})
            return
        evicted: list[tuple[_Kept, str]] = []
        with self._lock:
            if self._closed or req.model not in (self._model, self._canary):
                return
            old = self._kept.pop(conversation, None)
            if old is not None:  # a concurrent turn of the same conversation finished first
                self._kept_capacity -= old.capacity
                evicted.append((old, "replaced"))
            self._kept[conversation] = _Kept(gen, req.model, ids, req.prefilled, req.capacity)
            self._kept_capacity += req.capacity
            while (len(self._kept) > self.config.prefix_cache_conversations
                   or self._kept_capacity > self.config.prefix_cache_max_tokens):
                _, lru = self._kept.popitem(last=False)
                self._kept_capacity -= lru.capacity
                evicted.append((lru, "lru"))
        for _, reason in evicted:
            PREFIX_EVICTIONS.labels(reason).inc()
        self._gauge_kept()

    def _drop_kept(self, reason: str, which: Any) -> None:
        """Drop the kept Generators `which(kept)` selects (model switched, closing)."""
        with self._lock:
            gone = [c for c, k in self._kept.items() if which(k)]
            dropped = [self._kept.pop(c) for c in gone]
            self._kept_capacity -= sum(k.capacity for k in dropped)
        if dropped:
            PREFIX_EVICTIONS.labels(reason).inc(len(dropped))
            log.info("prefix cache dropped", extra={"reason": reason, "conversations": len(dropped)})
        del dropped
        self._gauge_kept()

    def _gauge_kept(self) -> None:
        with self._lock:
            conversations, capacity = len(self._kept), self._kept_capacity
            positions = sum(len(k.ids) for k in self._kept.values())
        PREFIX_CONVERSATIONS.set(conversations)
        PREFIX_TOKENS.set(capacity)
        held = self._running_held + positions
        KV_TOKENS.set(held)
        KV_USAGE.set(min(1.0, held / (self.config.max_running * self.context_length
                                     + self.config.prefix_cache_max_tokens)))

    def _round(self) -> None:
        """One decode step (or prefill chunk) of every running request."""
        with self._lock:
            batch = list(self._running)
        BATCH.observe(len(batch))
        reqs = list({id(seq.req): seq.req for seq in batch}.values())
        for req in reqs:
            try:
                if req.cancelled or req.deadline_passed():
                    self._finish_all(req, FinishReason.CANCELLED)
                else:
                    self._step(req)
            except Exception as exc:
                log.exception("decode step failed", extra={"request_id": req.request.request_id})
                self._finish_all(req, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
        if any(s.finish is not None for s in batch):
            with self._lock:
                self._running = [s for s in self._running if s.finish is None]
                RUNNING.set(len(self._running))
        for req in reqs:
            self._publish(req)
        self._running_held = sum(r.prefilled * len(r.seqs) + sum(q.tokens for q in r.seqs)
                                 for r in reqs if r.gen is not None)
        self._gauge_kept()

    @staticmethod
    def _finish_all(req: _Req, reason: FinishReason, error: str = "") -> None:
        for seq in req.seqs:
            if seq.finish is None:
                seq.finish, seq.error = reason, error

    def _step(self, req: _Req) -> None:
        ids = req.prompt_ids
        if req.prefilled < len(ids):
            n = req.request.sampling.n
            if n == 1:
                end = min(req.prefilled + self.config.prefill_chunk, len(ids))
                if len(ids) - end == 1:
                    end = len(ids)  # no one-token last chunk (see _resume: one row computes differently)
                req.gen.append_tokens(ids[req.prefilled:end])
            else:  # a multi-row batch takes its prompt in one append
                end = len(ids)
                req.gen.append_tokens(np.asarray([ids] * n, dtype=np.int32))
            PROMPT_TOKENS.inc((end - req.prefilled) * n)
            req.prefilled = end
            if end < len(ids):
                return  # more prompt to go next round; the others decode meanwhile
        elif req.pending is not None:  # the token the engine sampled last step goes in now
            req.gen.append_tokens([req.pending])
            req.pending = None
        if req.rng is not None:
            s = req.request.sampling
            token = sample_token(req.gen.get_logits()[0, -1], s.temperature, s.top_p, req.model.top_k, req.rng)
            tokens: Any = (token,)
            # Appended next round (or never, if this was the last token): the same positions a
            # greedy Generator would hold, and the context bound it would reach.
            req.pending = token
            full = len(ids) + req.seqs[0].tokens + 1 >= req.capacity
        else:
            req.gen.generate_next_token()
            tokens = req.gen.get_next_tokens()
            full = False
        now = time.perf_counter()
        if not req.first_token_at:
            req.first_token_at = now
            TTFT.observe(now - req.submitted)
        limit = req.request.sampling.max_tokens
        for seq in req.seqs:
            if seq.finish is not None:
                continue  # a finished row still rides along in the batch; its tokens are dropped
            token = int(tokens[seq.index])
            if seq.last_token_at:
                ITL.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if token in req.model.eos:
                seq.finish = FinishReason.STOP
                continue
            seq.tokens += 1
            seq.unreported_tokens += 1
            GENERATED_TOKENS.inc()
            text, stopped = seq.stops.feed(seq.stream.decode(token))
            seq.unreported_text += text
            if stopped:
                seq.finish = FinishReason.STOP
            elif seq.tokens >= limit:
                seq.finish = FinishReason.LENGTH
        if full or req.gen.is_done():
            self._finish_all(req, FinishReason.LENGTH)  # context length reached

    def _publish(self, req: _Req) -> None:
        """Hand the candidates' new output to the caller's loop; retire the request when all ended."""
        deltas: list[Delta] = []
        for seq in req.seqs:
            if seq.finish is not None and not seq.reported_finish:
                seq.unreported_text += seq.stops.flush()  # held text was no stop string after all
                seq.stream = None
            if seq.unreported_text or seq.unreported_tokens or (seq.finish and not seq.reported_finish):
                deltas.append(Delta(
                    index=seq.index, text=seq.unreported_text, tokens=seq.unreported_tokens,
                    finish_reason=seq.finish if not seq.reported_finish else None,
                    model_version=req.model.version, prompt_tokens=len(req.prompt_ids),
                    completion_tokens=seq.tokens, error=seq.error))
                seq.unreported_text, seq.unreported_tokens = "", 0
                if seq.finish is not None:
                    seq.reported_finish = True
        done = all(s.reported_finish for s in req.seqs)
        if req.gen is not None and all(s.finish is not None for s in req.seqs):
            # Keep the KV cache for the conversation's next turn, or free it now (not when the
            # caller lets go of the request).
            self._keep(req)
        if done and not req.done:
            req.done = True
            E2E.observe(time.perf_counter() - req.submitted)
            outcome = "cancelled" if any(s.finish is FinishReason.CANCELLED for s in req.seqs) else (
                "error" if any(s.finish is FinishReason.ERROR for s in req.seqs) else "ok")
            REQUESTS.labels(outcome).inc()
            with self._lock:
                reqs = self._by_id.get(req.request.request_id, [])
                if req in reqs:
                    reqs.remove(req)
                if not reqs:
                    self._by_id.pop(req.request.request_id, None)
        if deltas or done:
            try:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, (deltas, done))
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                req.cancelled = True
