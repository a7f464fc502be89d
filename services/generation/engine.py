"""Continuous-batching text generation on plain ONNX Runtime, with no Ray and no gRPC.

Like vLLM's engine is separate from its entrypoints, this module only knows prompts, sampling
options and tokens; `deployment.py` puts it behind Ray Serve and gRPC, `worker.py` behind Kafka.
This file is the asyncio facade: `submit()` validates and queues, one scheduler thread runs the
passes, each caller's `Stream` gets its deltas. The parts, one concern each:

| file | what |
|---|---|
| `schema.py` | public types (Request, Sampling, Delta, errors); the knobs are `config.EngineSettings` |
| `runner.py` | model loading (session, tokenizer, graph facts) and the two forward passes (IOBinding) |
| `kv_cache.py` | preallocated KV slots the graph updates in place; compaction and copies |
| `scheduler.py` | one `step()` = one pass: a prefill chunk or a decode token for every running row |
| `prefix_cache.py` | block-hashed prefilled KV (prompts; answers via cache fills), LRU by bytes, per version |
| `sampler.py`, `stop.py` | next-token choice (greedy/temperature/top-k/top-p/repetition), stop strings |
| `metrics.py` | Prometheus metrics |

Each model version (the stable one, a canary, one being retired) has its own scheduler and KV
slots, so requests in flight finish on the version they started with; the thread steps every
scheduler that has work in turn. The router sends a conversation's turns to one replica, so its
earlier turns' blocks are in that replica's prefix cache: its prompts' blocks from their
prefills, its answers' from the cache fills the scheduler runs while no request waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from services.generation import metrics as M
from services.generation import rollout
from services.generation.config import EngineSettings
from services.generation.runner import LoadedModel, cuda_device_count, resolve_provider
from services.generation.sampler import sample_token
from services.generation.scheduler import Job, Scheduler
from services.generation.schema import (
    DeadlineExceeded,
    Delta,
    EngineClosed,
    EngineError,
    FinishReason,
    InvalidRequest,
    Overloaded,
    Request,
    Sampling,
    seed_for,
)
from services.generation.stop import StopMatcher

__all__ = ["AsyncEngine", "DeadlineExceeded", "Delta", "EngineClosed", "EngineError",
           "FinishReason", "InvalidRequest", "LoadedModel", "Overloaded", "Request", "Sampling", "StopMatcher",
           "Stream", "cuda_device_count", "merge", "pace", "resolve_provider", "sample_token", "seed_for"]

log = logging.getLogger(__name__)


class _Bridge:
    """The caller's event loop and queue: where a job's deltas go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[list[Delta], bool]] = asyncio.Queue()


class Stream:
    """A submitted request: iterate it for batches of deltas; `cancel()` stops it within a step."""

    def __init__(self, engine: AsyncEngine, job: Job) -> None:
        self._engine = engine
        self._job = job
        self.request_id = job.request.request_id
        self.prompt_tokens = len(job.ids)
        self.model_version = job.model.version
        self.first_token_unix_ms = 0
        # Callers across a network (Serve) set these: at most one batch per interval, so a fast
        # model sends fewer, larger messages, and the relay spends its time waiting, not copying.
        # The interval is `min_interval_s`, or longer under load with `messages_per_s` (see `pace`).
        self.min_interval_s = 0.0
        self.messages_per_s = 0.0
        # The first this many messages keep `min_interval_s` alone: an answer's opening words are
        # what a person, and output moderation's first chunk, wait for (`pace`).
        self.opening_messages = 0

    def cancel(self) -> None:
        self._job.cancelled = True
        self._engine._wake()

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        """Yield the deltas ready at each moment (one or more per candidate) until all finished."""
        finished, messages = False, 0
        queue = self._job.bridge.queue
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
                    messages += 1
                    if not done and (self.min_interval_s > 0 or self.messages_per_s > 0):
                        interval = pace(self.min_interval_s, self._engine.running_candidates,
                                        self.messages_per_s, sent=messages, opening=self.opening_messages)
                        await asyncio.sleep(interval - (time.monotonic() - sent))
                if done:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client gone, task cancelled): stop decoding
                self.cancel()


def pace(min_interval_s: float, running: int, messages_per_s: float, *, sent: int = 0, opening: int = 0) -> float:
    """A stream's least time between two messages: `min_interval_s`, or `running / messages_per_s`
    when that is longer (0 turns it off) and the stream has sent its `opening` messages.

    Every message costs the serving path (Ray's streaming generator, Serve's proxy, the client)
    about the same CPU however many tokens it carries, on the cores the model runs on. With this
    the replica's streams together send about `messages_per_s` messages at most: one stream still
    gets a message per token (TTFT and its inter-token latency unchanged), 16 streams get a few
    tokens per message instead of one. A stream's opening messages are not slowed by load
    (`Stream.opening_messages`): the first words reach a person, and output moderation's first
    chunk, at step speed; a few extra messages per answer cost little.
    """
    if messages_per_s <= 0 or sent < opening:
        return min_interval_s
    return max(min_interval_s, running / messages_per_s)


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

    def __init__(self, model_dir: str | Path, version: str, config: EngineSettings | None = None) -> None:
        self.config = config or EngineSettings()  # validated when built
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._sched: dict[int, Scheduler] = {}  # id(model) -> its scheduler, retired ones included
        # Versions no new request will use; their schedulers go once idle. Explicit, not "neither
        # stable nor canary": a version being loaded is neither yet, and must not be dropped.
        self._retired: set[int] = set()
        self._model = self._load(model_dir, version)
        self._canary: LoadedModel | None = None  # a second version for a share of conversations
        self._canary_percent = 0
        self.provider = self._model.provider
        self._by_id: dict[str, list[Job]] = {}
        self._running = 0  # candidates in running batches after the last step (Stream's pacing)
        self._closed = False
        self.loop_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop_guarded, name="generation-engine", daemon=True)
        self._thread.start()

    def _load(self, path: str | Path, version: str) -> LoadedModel:
        model = LoadedModel(path, version, self.config.provider, self.config.threads, self.config.spin,
                            self.config.float32_rows)
        sched = Scheduler(model, self.config, self._lock)
        if self.config.warm_up:  # before the loop can see it: nothing else uses its slots yet
            log.info("engine warmed up", extra={"model_version": version, "rows": self.config.max_running,
                                                "seconds": round(sched.warm_up(), 2)})
        with self._lock:
            self._sched[id(model)] = sched
        M.MODEL_INFO.labels(version, model.provider).set(1)
        return model

    # -- public API ---------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """The version new requests are served by."""
        return self._model.version

    @property
    def running_candidates(self) -> int:
        """Candidates decoding after the scheduler's last step (read without the lock: a pacing hint)."""
        return self._running

    @property
    def context_length(self) -> int:
        return self._sched[id(self._model)].slot_tokens

    def stats(self) -> dict[str, Any]:
        with self._lock:
            scheds = list(self._sched.values())
            caches = [s.cache for s in scheds if s.cache is not None]
            return {"running": sum(s.busy_slots() for s in scheds), "waiting": sum(len(s.waiting) for s in scheds),
                    "model_version": self._model.version, "provider": self.provider,
                    # passes over this many rows/tokens or more run on the float32 copy (0: none loaded)
                    "float32_rows": self._model.float32_rows,
                    "canary_version": self._canary.version if self._canary else "",
                    "canary_percent": self._canary_percent,
                    "max_running": self.config.max_running, "max_waiting": self.config.max_waiting,
                    "prefix_cache_tokens": sum(c.tokens for c in caches),
                    "prefix_cache_bytes": sum(c.nbytes for c in caches)}

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
        sched = self._sched[id(model)]
        ids = model.encode(request.prompt)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(ids) >= sched.slot_tokens:
            raise InvalidRequest("prompt", f"{len(ids)} tokens, but the model's context is "
                                           f"{sched.slot_tokens} tokens")
        job = Job(request, model, ids, _Bridge(asyncio.get_running_loop()))
        with self._cv:
            # Waiting requests that fit the free slots are about to run (FIFO); the rest really wait.
            free, queued = self.config.max_running - sched.busy_slots(), 0
            for j in sched.waiting:
                if not queued and len(j.cands) <= free:
                    free -= len(j.cands)
                else:
                    queued += 1
            if ((queued or n > free) and queued >= self.config.max_waiting) or (
                    sched.waiting and sched.queued_tokens + len(ids) > self.config.max_queued_prompt_tokens):
                M.REQUESTS.labels("overloaded", model.version).inc()
                raise Overloaded(f"generation is at capacity ({sched.busy_slots()} candidates running, "
                                 f"{len(sched.waiting)} requests with {sched.queued_tokens} prompt tokens "
                                 "waiting); retry later")
            sched.waiting.append(job)
            sched.queued_tokens += len(ids)
            self._by_id.setdefault(request.request_id, []).append(job)
            M.WAITING.set(sum(len(s.waiting) for s in self._sched.values()))
            self._cv.notify()
        return Stream(self, job)

    async def generate(self, request: Request) -> AsyncIterator[list[Delta]]:
        """submit() and iterate, for callers that need no handle on the stream."""
        async for deltas in self.submit(request):
            yield deltas

    def cancel(self, request_id: str) -> bool:
        """Stop every in-flight request with this id within one decode step; False if none."""
        with self._lock:
            jobs = list(self._by_id.get(request_id, ()))
        for job in jobs:
            job.cancelled = True
        self._wake()
        return bool(jobs)

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
        current = self._canary
        if path is None or percent <= 0:
            self._canary, self._canary_percent = None, 0
            self._retire(current)
            return
        if current is None or current.version != version or current.path != Path(path):
            self._canary = await asyncio.to_thread(self._load, path, version)
            self._retire(current)
        self._canary_percent = percent
        log.info("canary set", extra={"canary_version": version, "canary_percent": percent,
                                      "stable_version": self._model.version})

    async def load_version(self, path: str | Path, version: str) -> None:
        """Load another model version; new requests use it, in-flight ones finish on the old one."""
        if version == self._model.version and Path(path) == self._model.path:
            return
        loaded = await asyncio.to_thread(self._load, path, version)
        old, self._model = self._model, loaded  # one reference swap: submit() binds a job to one model
        self._retire(old)
        log.info("model version switched", extra={"from_version": old.version, "to_version": version})

    def _retire(self, model: LoadedModel | None) -> None:
        """A version no new request will use: its prefix cache goes now, its slots when idle."""
        if model is None or model is self._model or model is self._canary:
            return
        with self._lock:
            sched = self._sched.get(id(model))
            self._retired.add(id(model))
        if sched is not None and sched.cache is not None:
            sched.cache.close("model")
        if model.version not in (self._model.version, self._canary.version if self._canary else ""):
            with contextlib.suppress(KeyError):
                M.MODEL_INFO.remove(model.version, model.provider)
        self._wake()

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for `grace_s`, cancel the rest, stop."""
        self._closed = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.stats()["running"] + self.stats()["waiting"]:
            await asyncio.sleep(0.05)
        with self._lock:
            for jobs in self._by_id.values():
                for job in jobs:
                    job.cancelled = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 10)
        with self._lock:
            for sched in self._sched.values():
                sched.release()
        self._gauges()

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
                jobs = [j for js in self._by_id.values() for j in js]
            for job in jobs:
                job.finish_all(FinishReason.ERROR, f"engine crashed: {exc!r}")
            self._publish(jobs)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._closed:  # queued cache fills are no request's work: not worth a close's wait
                    for s in self._sched.values():
                        s.drop_fills()
                while not any(s.has_work() for s in self._sched.values()):
                    if self._closed:
                        return
                    self._cv.wait(0.5)
                scheds = list(self._sched.values())
            for sched in scheds:
                if sched.has_work():
                    self._publish(sched.step())
            self._drop_retired()
            self._gauges()

    def _drop_retired(self) -> None:
        with self._lock:
            for key in [k for k in self._retired if k in self._sched and not self._sched[k].has_work()]:
                self._sched.pop(key).release()
                self._retired.discard(key)

    def _gauges(self) -> None:
        with self._lock:
            scheds = list(self._sched.values())
        rows = [c for s in scheds for c in s.running]
        caches = [s.cache for s in scheds if s.cache is not None]
        self._running = len(rows)
        M.RUNNING.set(len(rows))
        M.WAITING.set(sum(len(s.waiting) for s in scheds))
        held = sum(c.length for c in rows)
        M.KV_TOKENS.set(held + sum(c.tokens for c in caches))
        M.KV_USAGE.set(min(1.0, held / max(1, sum(self.config.max_running * s.slot_tokens for s in scheds))))
        M.PREFIX_TOKENS.set(sum(c.tokens for c in caches))
        M.PREFIX_BYTES.set(sum(c.nbytes for c in caches))

    def _publish(self, jobs: Iterable[Job]) -> None:
        """Hand the jobs' new output to their callers' loops: one wake-up per loop, not per job.

        At 16 streams a decode step has news for 16 jobs; one call_soon_threadsafe each would wake
        the replica's event loop (a write to its self-pipe) 16 times per step.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple[list[Delta], bool]]]] = {}
        for job in jobs:
            item = self._collect(job)
            if item is not None:
                by_loop.setdefault(job.bridge.loop, []).append((job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(job.bridge.queue, item) for job, item in items])
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                for job, _ in items:
                    job.cancelled = True

    def _collect(self, job: Job) -> tuple[list[Delta], bool] | None:
        """The job's new deltas (and whether it is done); retires the job when all candidates ended."""
        deltas: list[Delta] = []
        for c in job.cands:
            if c.finish is not None and not c.reported_finish:
                c.text += c.stops.flush()  # held text was no stop string after all
            if c.text or c.new_tokens or (c.finish and not c.reported_finish):
                deltas.append(Delta(
                    index=c.index, text=c.text, tokens=c.new_tokens,
                    finish_reason=c.finish if not c.reported_finish else None,
                    model_version=job.model.version, prompt_tokens=len(job.ids),
                    completion_tokens=len(c.generated), error=c.error))
                c.text, c.new_tokens = "", 0
                if c.finish is not None:
                    c.reported_finish = True
        done = all(c.reported_finish for c in job.cands)
        if done and not job.done:
            job.done = True
            M.E2E.observe(time.perf_counter() - job.submitted)
            outcome = "cancelled" if any(c.finish is FinishReason.CANCELLED for c in job.cands) else (
                "error" if any(c.finish is FinishReason.ERROR for c in job.cands) else "ok")
            M.REQUESTS.labels(outcome, job.model.version).inc()
            with self._lock:
                jobs = self._by_id.get(job.request.request_id, [])
                if job in jobs:
                    jobs.remove(job)
                if not jobs:
                    self._by_id.pop(job.request.request_id, None)
        return (deltas, done) if deltas or done else None


def _deliver(items: list[tuple[asyncio.Queue[tuple[list[Delta], bool]], tuple[list[Delta], bool]]]) -> None:
    """On the caller's loop: put each job's news into its stream's queue."""
    for queue, item in items:
        queue.put_nowait(item)
