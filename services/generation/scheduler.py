"""Continuous batching for one model version: every `step()` is one forward pass.

A pass is either one batch-1 chunk of one prompt's prefill (into the staging slot) or one decode
token for every running candidate (rows 0..B-1 of the slot buffers). Between two decode passes
run prefill chunks of at most `prefill_chunk` tokens together (the per-step budget, like vLLM's
chunked prefill): one chunk of a long prompt, or several short prompts (often only a prompt's
tail, the rest coming from the prefix cache) one after the other, so a burst of short requests
joins in fewer decode gaps and a running stream still waits at most that many prompt tokens
between two of its tokens. GroupQueryAttention cannot mix prefill and decode in one pass, nor
prefill several prompts with past context in one (engine-notes.md). Requests join when their prefill ends (the prompt
KV is copied from staging into one slot per candidate: n candidates share one prefill) and leave
as soon as they finish (the last row moves into the freed slot). Cancellation and deadlines are
checked at every step. The engine thread is the only caller of `step()`; `submit` only appends
to `waiting` under the shared lock.

A finished answer (n == 1, STOP or LENGTH) queues a `Fill`: its prompt + answer ids (+ the end
token that the chat template renders after every earlier answer: the EOS it stopped on, or, cut
at max_tokens, the model's EOS when it has only one) prefilled in the staging
slot in the same chunks, from the end of what the prefix cache already holds, and inserted into
the cache after every chunk. A fill chunk takes a prefill chunk's turn only while no request
waits or prefills (`next_pass`), so a user's prefill waits at most the one fill chunk in flight
when it arrived, and a decode step at most one chunk, as with a prefill. A request admitted
mid-fill takes the staging slot; the fill restarts later from the blocks it already inserted.
Cost: the prefill the conversation's next turn would have done for those tokens, done earlier.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tokenizers.decoders import DecodeStream

from services.generation import metrics as M
from services.generation.config import EngineSettings
from services.generation.prefix_cache import PrefixCache
from services.generation.runner import Forward, LoadedModel
from services.generation.sampler import next_token
from services.generation.schema import FinishReason, Request, seed_for
from services.generation.stop import StopMatcher

log = logging.getLogger(__name__)


class Cand:
    """One candidate answer: its tokens, its slot's fill and what the caller has not seen yet."""

    def __init__(self, job: Job, index: int) -> None:
        s = job.request.sampling
        self.job, self.index = job, index
        self.rng = np.random.default_rng(seed_for(job.request.request_id, s.seed, index)) if s.temperature > 0 else None
        self.generated: list[int] = []
        self.length = 0  # KV positions its slot holds
        self.last = -1  # the token to feed in the next decode pass
        self.detok = DecodeStream(skip_special_tokens=True)
        self.stops = StopMatcher(s.stop)
        self.finish: FinishReason | None = None
        self.error = ""
        self.text = ""  # not reported yet
        self.new_tokens = 0  # not reported yet
        self.reported_finish = False
        self.last_token_at = 0.0
        self.guard = job.copy_guard() if job.copy_guard is not None else None  # against copying earlier answers


class Job:
    """A submitted request in the scheduler; `bridge` is the engine's link to the caller."""

    def __init__(self, request: Request, model: LoadedModel, ids: list[int], bridge: Any = None) -> None:
        # The answering model fills what the request left unset (its manifest's defaults).
        request = dataclasses.replace(request, sampling=model.resolve(request.sampling))
        self.request, self.model, self.ids, self.bridge = request, model, ids, bridge
        self.copy_guard = model.copy_guard(ids, request.sampling.copy_penalty or 0.0)
        self.cands = [Cand(self, i) for i in range(request.sampling.n)]
        self.prefilled = 0
        self.reused = 0  # prompt tokens whose KV came from the prefix cache
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at = 0.0
        self.done = False

    def dead(self) -> bool:
        d = self.request.deadline_unix_ms
        return self.cancelled or (bool(d) and time.time() * 1000 > d)

    def finish_all(self, reason: FinishReason, error: str = "") -> None:
        for c in self.cands:
            if c.finish is None:
                c.finish, c.error = reason, error


class Fill:
    """A finished answer's ids (prompt + answer [+ EOS], whole blocks) to prefill into the prefix cache."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.prefilled = 0  # positions of `ids` in the staging slot while it is staged


def next_pass(*, prefilling: bool, waiting: bool, running: bool, fill: bool, last: str,
              crowded: bool = False, room: bool = False) -> str:
    """The pass a step runs: "prefill", "fill" (a cache fill's chunk), "decode" or "" (none).

    Prefill and decode alternate while both have work (`last` is the previous pass), except that
    a prefill may follow a prefill while the decode gap has `room` (its prefill tokens so far
    plus the next chunk's within the per-step budget); a cache fill
    takes a prefill's turn only when no request is prefilling or waiting, so it never delays a
    user's prefill, and a decode by no more than one chunk; and not while the running batch is
    `crowded` (over half of max_running): a fill is work that pays off only if the conversation
    comes back, so at high load it waits (or is dropped) rather than slowing every running stream.
    """
    chunk_turn = not running or last == "decode"
    if prefilling and (chunk_turn or (last == "prefill" and room)):
        return "prefill"
    if fill and chunk_turn and not prefilling and not waiting and not crowded:
        return "fill"
    return "decode" if running else ""


def chunk_len(rest: int, chunk: int) -> int:
    """Tokens in the next prefill chunk of `rest`: at most `chunk`, never leaving a one-token last
    chunk (one row computes differently: see prefix_cache)."""
    n = min(chunk, rest)
    if rest - n == 1:
        n = n - 1 if n >= 3 else rest
    return n


class Scheduler:
    """Waiting queue, one prefilling job, the running rows and their KV slots, for one model."""

    def __init__(self, model: LoadedModel, config: EngineSettings, lock: threading.Lock) -> None:
        self.model, self.config, self.lock = model, config, lock
        self.slot_tokens = min(model.context_length, config.slot_tokens)
        self.waiting: collections.deque[Job] = collections.deque()
        self.queued_tokens = 0  # prompt tokens in `waiting`
        self.prefilling: Job | None = None
        self.running: list[Cand] = []  # row i decodes in slot i
        self.cache: PrefixCache | None = None
        if config.prefix_cache_conversations > 0:
            budget = config.prefix_cache_tokens * model.kv_bytes_per_token()
            self.cache = PrefixCache(model.version, config.prefix_cache_block, budget, model.kv_bytes_per_token(),
                                     config.prefix_cache_min_tokens)
        # Finished answers to prefill into the cache; a full deque drops its oldest on append.
        self.fills: collections.deque[Fill] = collections.deque(maxlen=config.prefix_cache_answers)
        self._staged: Fill | None = None  # the fill whose KV the staging slot holds
        self._fw: Forward | None = None  # allocated on first use, freed by release()
        self._last = "decode"
        self._gap = 0  # prompt tokens prefilled since the last decode pass

    # -- state read by the engine (under its lock) -------------------------------------------
    def busy_slots(self) -> int:
        return len(self.running) + (len(self.prefilling.cands) if self.prefilling else 0)

    def has_work(self) -> bool:
        fills = bool(self.fills) and self.cache is not None and self.cache.capacity > 0
        return bool(self.waiting or self.prefilling or self.running or fills)

    def drop_fills(self) -> None:
        """Forget the queued cache fills (the engine is closing); engine thread only."""
        if self.fills:
            M.PREFIX_FILLS.labels("dropped").inc(len(self.fills))
        self.fills.clear()
        self._staged = None

    def release(self) -> None:
        """Free the KV slots and the prefix cache (a retired model version, or close)."""
        self.drop_fills()
        self._fw = None
        if self.cache is not None:
            self.cache.close("model")

    # -- one pass ------------------------------------------------------------------------------
    def step(self) -> set[Job]:
        """Reap dead jobs, admit one, run one pass; the jobs with news for their callers."""
        touched: set[Job] = set()
        self._reap(touched)
        self._compact()  # a cancelled row must not ride along in this pass
        self._admit(touched)
        idle = self.prefilling is None and not self.waiting
        crowded = len(self.running) > self.config.max_running // 2
        room = False
        if self.prefilling is not None:
            rest = len(self.prefilling.ids) - self.prefilling.prefilled
            room = self._gap + chunk_len(rest, self.config.prefill_chunk) <= self.config.prefill_chunk
        kind = next_pass(prefilling=self.prefilling is not None, waiting=bool(self.waiting),
                         running=bool(self.running), fill=idle and not crowded and self._stage_fill(),
                         last=self._last, crowded=crowded, room=room)
        if kind == "decode":
            self._gap = 0
        started = time.perf_counter()
        if kind == "prefill":
            self._guard(self._prefill, touched, [self.prefilling])
        elif kind == "fill":
            self._guard(self._fill, touched, [])
        elif kind == "decode":
            self._guard(self._decode, touched, list({id(c.job): c.job for c in self.running}.values()))
        if kind:
            self._last = kind
            M.STEP.labels(kind).observe(time.perf_counter() - started)
        self._compact()
        return touched

    def _guard(self, run: Callable[[set[Job]], None], touched: set[Job], jobs: list[Job]) -> None:
        """A failing pass ends the jobs it carried with ERROR; the scheduler goes on."""
        try:
            run(touched)
        except Exception as exc:
            log.exception("forward pass failed", extra={"model_version": self.model.version})
            for job in jobs:
                job.finish_all(FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
                touched.add(job)
            if self.prefilling in jobs:
                self.prefilling = None
            if not jobs and self.fills:  # a failed cache fill: drop it, never retry it forever
                self.fills.popleft()
                self._staged = None
                M.PREFIX_FILLS.labels("dropped").inc()

    def _reap(self, touched: set[Job]) -> None:
        with self.lock:
            dead = [j for j in self.waiting if j.dead()]
            for j in dead:
                self.waiting.remove(j)
                self.queued_tokens -= len(j.ids)
        if self.prefilling is not None and self.prefilling.dead():
            dead.append(self.prefilling)
            self.prefilling = None
        dead += list({id(c.job): c.job for c in self.running if c.job.dead()}.values())
        for job in dead:
            job.finish_all(FinishReason.CANCELLED)
            touched.add(job)

    def _admit(self, touched: set[Job]) -> None:
        """Start the next waiting job's prefill when its candidates will have slots."""
        if self.prefilling is not None:
            return
        with self.lock:
            if not self.waiting or len(self.running) + len(self.waiting[0].cands) > self.config.max_running:
                return
            job = self.waiting.popleft()
            self.queued_tokens -= len(job.ids)
        M.QUEUE.observe(time.perf_counter() - job.submitted)
        try:
            fw = self._forward()
            self._staged = None  # the request's prefill takes the staging slot
            if self.cache is not None:
                blocks = self.cache.lookup(job.ids)
                if blocks:
                    fw.kv.write(fw.kv.staging, 0, np.concatenate(blocks, axis=3))
                    job.prefilled = job.reused = len(blocks) * self.cache.block
            self.prefilling = job
        except Exception as exc:
            log.exception("could not start a request", extra={"request_id": job.request.request_id})
            job.finish_all(FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
            touched.add(job)

    def _forward(self) -> Forward:
        if self._fw is None:
            kv = self.model.new_kv(self.config.max_running + 1, self.slot_tokens)
            self._fw = Forward(self.model, kv)
            log.info("kv slots allocated", extra={"model_version": self.model.version, "slots": kv.slots,
                                                  "slot_tokens": kv.tokens, "bytes": kv.nbytes})
        return self._fw

    def warm_up(self) -> float:
        """One decode pass at every batch size and one prefill, before any request; the seconds it took.

        ONNX Runtime's first pass at a new input shape is several times slower than later ones
        (figures in bench/results/engine.md). Unwarmed, every join of a fresh engine's first streams
        stalled all of them that long (the ITL p99 of a cold benchmark).
        vLLM captures its CUDA graphs per batch size at start-up for the same reason. The passes
        write only free slots (rows start at length 0), which a request's KV overwrites when it joins.
        """
        started = time.perf_counter()
        fw = self._forward()
        fw.prefill(list(range(1, 9)), 0)
        for rows in range(1, self.config.max_running + 1):
            fw.decode(np.zeros(rows, np.int64), np.zeros(rows, np.int64))
        return time.perf_counter() - started

    def _prefill(self, touched: set[Job]) -> None:
        job, fw = self.prefilling, self._forward()
        assert job is not None
        pos, rest = job.prefilled, len(job.ids) - job.prefilled
        n = chunk_len(rest, self.config.prefill_chunk)
        logits = fw.prefill(job.ids[pos:pos + n], pos)
        job.prefilled += n
        self._gap += n
        M.PROMPT_TOKENS.inc(n)
        if job.prefilled < len(job.ids):
            return
        self.prefilling = None
        if self.cache is not None:
            self.cache.insert(job.ids, lambda a, b: fw.kv.read(fw.kv.staging, a, b))
        now = time.perf_counter()
        job.first_token_at = now
        M.TTFT.labels(job.model.version).observe(now - job.submitted)
        touched.add(job)
        for cand in job.cands:
            if cand.finish is not None:
                continue
            self._emit(cand, self._choose(cand, logits), now)
            if cand.finish is None:
                fw.kv.move(fw.kv.staging, len(self.running), len(job.ids))
                cand.length = len(job.ids)
                self.running.append(cand)

    def _stage_fill(self) -> bool:
        """Whether a cache fill is ready in the staging slot; stages the next one if need be.

        Dropped: fills with no cache to go to (off, retired), longer than the whole cache, or with
        fewer than two positions left to prefill (a one-row pass must not fill the cache).
        """
        cache = self.cache
        while self.fills:
            fill = self.fills[0]
            if cache is not None and cache.capacity and fill is self._staged:
                return True
            self._staged = None
            outcome = "dropped"
            if cache is not None and 0 < len(fill.ids) // cache.block <= cache.capacity:
                try:
                    found = cache.cached(fill.ids)
                    fill.prefilled = len(found) * cache.block
                    rest = len(fill.ids) - fill.prefilled
                    if rest >= 2:
                        fw = self._forward()
                        if found:
                            fw.kv.write(fw.kv.staging, 0, np.concatenate(found, axis=3))
                        self._staged = fill
                        return True
                    outcome = "cached" if rest == 0 else "dropped"
                except Exception:
                    log.exception("could not start a cache fill", extra={"model_version": self.model.version})
            self.fills.popleft()
            M.PREFIX_FILLS.labels(outcome).inc()
        return False

    def _fill(self, touched: set[Job]) -> None:
        """One chunk of the staged cache fill; its full blocks so far go into the cache."""
        fill, fw, cache = self._staged, self._forward(), self.cache
        assert fill is not None and cache is not None
        pos = fill.prefilled
        n = chunk_len(len(fill.ids) - pos, self.config.prefill_chunk)
        fw.prefill(fill.ids[pos:pos + n], pos)
        fill.prefilled += n
        M.PREFIX_FILL_TOKENS.inc(n)
        cache.insert(fill.ids[:fill.prefilled // cache.block * cache.block],
                     lambda a, b: fw.kv.read(fw.kv.staging, a, b))
        if fill.prefilled >= len(fill.ids):
            self.fills.popleft()
            self._staged = None
            M.PREFIX_FILLS.labels("done").inc()

    def _answered(self, cand: Cand, eos: int | None) -> None:
        """Queue a cache fill for a finished answer (n == 1) with whole blocks beyond its prompt's;
        `eos`: the end token the next turn's prompt will have after the answer, if known."""
        job, cache = cand.job, self.cache
        if len(job.cands) != 1 or cache is None or not cache.capacity or self.fills.maxlen == 0:
            return
        ids = job.ids + cand.generated + ([eos] if eos is not None else [])
        full = len(ids) // cache.block * cache.block
        if full > len(job.ids) // cache.block * cache.block:
            if len(self.fills) == self.fills.maxlen:
                M.PREFIX_FILLS.labels("dropped").inc()
                if self.fills[0] is self._staged:
                    self._staged = None
            self.fills.append(Fill(ids[:full]))

    def _decode(self, touched: set[Job]) -> None:
        rows, fw = self.running, self._forward()
        M.BATCH.observe(len(rows))
        tokens = np.fromiter((c.last for c in rows), np.int64, len(rows))
        lengths = np.fromiter((c.length for c in rows), np.int64, len(rows))
        logits = fw.decode(tokens, lengths)
        now = time.perf_counter()
        for i, cand in enumerate(rows):
            cand.length += 1
            self._emit(cand, self._choose(cand, logits[i]), now)
            touched.add(cand.job)

    def _choose(self, cand: Cand, logits: np.ndarray) -> int:
        s = cand.job.request.sampling
        window = int(self.model.sampling["repetition_window"])
        recent = cand.generated[-window:] if s.repetition_penalty != 1.0 and window > 0 else ()
        if cand.guard is not None:
            logits = cand.guard.apply(logits.astype(np.float32, copy=False))
        return next_token(logits, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k,
                          penalty=s.repetition_penalty, recent=recent, rng=cand.rng)

    def _emit(self, cand: Cand, token: int, now: float) -> None:
        """Account one new token of a candidate: EOS, detokenize, stop strings, limits."""
        if cand.last_token_at:
            M.ITL.observe(now - cand.last_token_at)
        cand.last_token_at = now
        job = cand.job
        if token in self.model.eos and not job.request.sampling.ignore_eos:
            cand.finish = FinishReason.STOP
            self._answered(cand, token)
            return
        cand.generated.append(token)
        cand.new_tokens += 1
        M.GENERATED_TOKENS.inc()
        piece = cand.detok.step(self.model.tokenizer, token) or ""
        if cand.guard is not None:
            cand.guard.feed(token, piece)
        text, stopped = cand.stops.feed(piece)
        cand.text += text
        if stopped:
            cand.finish = FinishReason.STOP
        elif (len(cand.generated) >= job.request.sampling.max_tokens
              or len(job.ids) + len(cand.generated) >= self.slot_tokens):
            cand.finish = FinishReason.LENGTH  # asked length, or no KV position left for this token
        else:
            cand.last = token
            return
        # The next prompt renders a cut answer followed by the end token too; one stop-string-cut
        # differs from its ids at the stop string, so no end token can match after it.
        end = next(iter(self.model.eos)) if cand.finish is FinishReason.LENGTH and len(self.model.eos) == 1 else None
        self._answered(cand, end)

    def _compact(self) -> None:
        """Drop finished rows; the last row moves into each freed slot (rows stay 0..B-1)."""
        rows, i = self.running, 0
        while i < len(rows):
            if rows[i].finish is None:
                i += 1
            elif i == len(rows) - 1:
                rows.pop()
            else:
                last = rows.pop()
                if last.finish is None:
                    assert self._fw is not None
                    self._fw.kv.move(len(rows), i, last.length)
                    rows[i] = last
                    i += 1
