"""The continuous-batching engine on the tiny model (real ONNX Runtime GenAI, no Ray, no gRPC)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.generation.engine import (
    AsyncEngine,
    DeadlineExceeded,
    Delta,
    EngineConfig,
    FinishReason,
    InvalidRequest,
    Overloaded,
    Request,
    Sampling,
    _StopMatcher,
    common_prefix,
    merge,
    sample_token,
    seed_for,
)

PROMPT = "<|im_start|>user\nTell me a story about the sea.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def engine(tiny_model_dir: Path):
    """A fresh engine per test (the tiny model loads in well under a second)."""
    engines: list[AsyncEngine] = []

    def make(**cfg: int) -> AsyncEngine:
        eng = AsyncEngine(tiny_model_dir, "tiny-v1", EngineConfig(**cfg))
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        asyncio.run(eng.close())


class Result:
    """What a consumer saw: text, finish reason and tokens per candidate, plus all deltas."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.finish: dict[int, FinishReason] = {}
        self.tokens: dict[int, int] = {}
        self.deltas: list[Delta] = []
        self.finished_at = 0.0

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.deltas.append(d)
            self.text[d.index] = self.text.get(d.index, "") + d.text
            if d.finish_reason is not None:
                self.finish[d.index] = d.finish_reason
                self.tokens[d.index] = d.completion_tokens


async def collect(eng: AsyncEngine, req: Request) -> Result:
    out = Result()
    async for deltas in eng.submit(req):
        out.add(deltas)
    out.finished_at = time.perf_counter()
    return out


def sample(max_tokens: int = 40, **kw: object) -> Sampling:
    return Sampling(temperature=1.0, top_p=0.95, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def test_generates_and_reports_version_and_usage(engine) -> None:
    eng = engine()
    res = asyncio.run(collect(eng, Request("r-basic", PROMPT, sample(30))))
    assert res.finish[0] in {FinishReason.LENGTH, FinishReason.STOP}
    assert all(d.model_version == "tiny-v1" for d in res.deltas)
    assert all(d.prompt_tokens > 10 for d in res.deltas)
    assert sum(d.tokens for d in res.deltas) == res.tokens[0] <= 30
    assert res.text[0]


def test_new_request_joins_running_batch_and_leaves_it(engine) -> None:
    """B arrives while A decodes, finishes first, and neither answer is disturbed by the other."""
    eng = engine(max_running=4)

    async def scenario() -> tuple[Result, Result, int, list[int]]:
        a_req = Request("r-long", PROMPT, sample(300))
        b_req = Request("r-short", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", sample(20))
        a = Result()
        stream_a = eng.submit(a_req)
        it = stream_a.__aiter__()
        a.add(await it.__anext__())  # A is running
        a_tokens_before_b = sum(d.tokens for d in a.deltas)
        running_seen: list[int] = []

        async def drain_a() -> None:
            async for deltas in it:
                running_seen.append(eng.stats()["running"])
                a.add(deltas)
            a.finished_at = time.perf_counter()

        async def watch() -> None:  # A's deltas are paced; sample the batch size between them too
            while not task.done():
                running_seen.append(eng.stats()["running"])
                await asyncio.sleep(0.001)

        task = asyncio.create_task(drain_a())
        watcher = asyncio.create_task(watch())
        b = await collect(eng, b_req)
        await task
        await watcher
        return a, b, a_tokens_before_b, running_seen

    a, b, before, running_seen = asyncio.run(scenario())
    assert before < 300 and b.finished_at < a.finished_at
    assert a.tokens[0] == 300 and a.finish[0] is FinishReason.LENGTH
    assert max(running_seen) == 2  # they really shared the batch
    assert eng.stats()["running"] == 0  # and both left it
    alone_a = asyncio.run(collect(eng, Request("r-long", PROMPT, sample(300))))
    alone_b = asyncio.run(collect(eng, Request("r-short", "<|im_start|>user\nHi<|im_end|>\n"
                                               "<|im_start|>assistant\n", sample(20))))
    assert a.text == alone_a.text and b.text == alone_b.text


def test_cancel_stops_within_one_decode_step(engine) -> None:
    eng = engine()

    async def scenario() -> tuple[int, Result]:
        res = Result()
        stream = eng.submit(Request("r-cancel", PROMPT, sample(1500)))
        at_cancel = -1
        async for deltas in stream:
            res.add(deltas)
            if at_cancel < 0 and sum(d.tokens for d in res.deltas) >= 5:
                seq = eng._running[0]  # the scheduler's own count, not what reached us so far
                at_cancel = seq.tokens
                assert eng.cancel("r-cancel")
        return at_cancel, res

    at_cancel, res = asyncio.run(scenario())
    assert res.finish[0] is FinishReason.CANCELLED
    # At most the step in progress when cancel() ran completes (plus one read race).
    assert res.tokens[0] - at_cancel <= 2, (at_cancel, res.tokens[0])
    assert eng.stats()["running"] == 0


def test_consumer_going_away_cancels(engine) -> None:
    eng = engine()

    async def scenario() -> None:
        stream = eng.submit(Request("r-gone", PROMPT, sample(1500)))
        async for _ in stream:
            break  # closes the async generator -> cancel
        for _ in range(100):
            if eng.stats()["running"] == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert eng.stats()["running"] == 0


def test_stop_strings_end_the_answer_and_are_trimmed(engine) -> None:
    eng = engine()
    full = asyncio.run(collect(eng, Request("r-stop", PROMPT, sample(80)))).text[0]
    assert len(full) > 30
    stop = full[15:21]  # spans token boundaries, found by substring search not token ids
    cut = full.find(stop)
    res = asyncio.run(collect(eng, Request("r-stop", PROMPT, sample(80, stop=("\x01never", stop)))))
    assert res.finish[0] is FinishReason.STOP
    assert res.text[0] == full[:cut]
    assert stop not in res.text[0]


def test_n_candidates_share_the_prompt(engine) -> None:
    eng = engine(max_running=4)
    res = asyncio.run(collect(eng, Request("r-n", PROMPT, sample(25, n=3))))
    assert sorted(res.finish) == [0, 1, 2]
    assert len({res.text[i] for i in range(3)}) == 3  # different seeds per candidate
    assert {d.prompt_tokens for d in res.deltas} == {res.deltas[0].prompt_tokens}


def test_seed_determinism(engine) -> None:
    eng = engine()
    run = lambda rid, **kw: asyncio.run(collect(eng, Request(rid, PROMPT, sample(30, **kw)))).text  # noqa: E731
    assert run("same-id") == run("same-id")  # no seed: derived from the request id (redelivery)
    assert run("a", seed=7) == run("b", seed=7)  # explicit seed wins over the id
    assert run("a", seed=7) != run("a", seed=8)
    assert seed_for("x", None, 0) == seed_for("x", None, 0) != seed_for("y", None, 0)
    assert 0 <= seed_for("x", 2**64 - 1, 3) < 2**31


def test_overload_raises(engine) -> None:
    eng = engine(max_running=1, max_waiting=1)

    async def scenario() -> None:
        a = eng.submit(Request("r-a", PROMPT, sample(1500)))
        b = eng.submit(Request("r-b", PROMPT, sample(1500)))
        with pytest.raises(Overloaded):
            eng.submit(Request("r-c", PROMPT, sample(10)))
        eng.cancel("r-a")
        eng.cancel("r-b")
        ra, rb = Result(), Result()
        async for d in a:
            ra.add(d)
        async for d in b:
            rb.add(d)
        assert ra.finish[0] is FinishReason.CANCELLED and rb.finish[0] is FinishReason.CANCELLED

    asyncio.run(scenario())


def test_deadline(engine) -> None:
    eng = engine()

    async def scenario() -> Result:
        with pytest.raises(DeadlineExceeded):
            eng.submit(Request("r-late", PROMPT, sample(10), deadline_unix_ms=int(time.time() * 1000) - 1))
        return await collect(eng, Request("r-dl", PROMPT, sample(1900),
                                          deadline_unix_ms=int(time.time() * 1000) + 150))

    started = time.perf_counter()
    res = asyncio.run(scenario())
    assert res.finish[0] is FinishReason.CANCELLED
    assert time.perf_counter() - started < 1.0


def test_invalid_requests_name_the_field(engine) -> None:
    eng = engine(max_running=2)

    async def scenario() -> None:
        with pytest.raises(InvalidRequest) as err:
            eng.submit(Request("r", "", sample()))
        assert err.value.field == "prompt"
        with pytest.raises(InvalidRequest) as err:
            eng.submit(Request("r", "word " * 3000, sample()))
        assert err.value.field == "prompt" and "context" in str(err.value)
        with pytest.raises(InvalidRequest) as err:
            eng.submit(Request("r", PROMPT, sample(n=3)))
        assert err.value.field == "sampling.n"

    asyncio.run(scenario())


def test_model_swap_keeps_in_flight_requests_on_the_old_version(engine, tiny_model_dir: Path) -> None:
    eng = engine()

    async def scenario() -> tuple[Result, Result]:
        old = Result()
        it = eng.submit(Request("r-old", PROMPT, sample(300))).__aiter__()
        old.add(await it.__anext__())
        await eng.load_version(tiny_model_dir, "tiny-v2")
        new = await collect(eng, Request("r-new", PROMPT, sample(10)))
        async for d in it:
            old.add(d)
        return old, new

    old, new = asyncio.run(scenario())
    assert {d.model_version for d in old.deltas} == {"tiny-v1"}
    assert old.finish[0] is FinishReason.LENGTH and old.tokens[0] == 300
    assert {d.model_version for d in new.deltas} == {"tiny-v2"}
    assert eng.model_version == "tiny-v2"


def test_stop_matcher_holds_back_possible_prefixes() -> None:
    m = _StopMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X") == ("ENX", False)
    assert m.feed(" a\n") == (" a", False)
    assert m.feed("\nrest") == ("", True)
    m2 = _StopMatcher(["abc"])
    assert m2.feed("xxab") == ("xx", False)
    assert m2.flush() == "ab"
    assert _StopMatcher([]).feed("abc") == ("abc", False)


def test_merge_coalesces_per_candidate() -> None:
    d = lambda i, t, n, f=None: Delta(i, t, n, f, "v", 3, 0)  # noqa: E731
    out = merge([d(0, "a", 1), d(1, "x", 1), d(0, "b", 2, FinishReason.STOP)])
    assert [(m.index, m.text, m.tokens, m.finish_reason) for m in out] == [
        (0, "ab", 3, FinishReason.STOP), (1, "x", 1, None)]


@pytest.mark.model
def test_real_model_answers_and_stops(real_model_dir: Path) -> None:
    """The served build answers a question it is known to get right, and stop strings cut it."""
    from model.chat_template import render_chatml

    eng = AsyncEngine(real_model_dir, "real", EngineConfig(max_running=4))
    try:
        prompt = render_chatml([{"role": "user", "content": "What is the capital of France?"}])
        greedy = Sampling(temperature=0, max_tokens=60)
        res = asyncio.run(collect(eng, Request("real-1", prompt, greedy)))
        assert "Paris" in res.text[0]
        # Greedy int4 builds may ramble to max_tokens instead of ending their turn.
        assert res.finish[0] in {FinishReason.STOP, FinishReason.LENGTH}
        cut = asyncio.run(collect(eng, Request("real-1", prompt, Sampling(temperature=0, max_tokens=60,
                                                                          stop=("Paris",)))))
        assert cut.text[0] == res.text[0][:res.text[0].index("Paris")]
        several = asyncio.run(collect(eng, Request("real-2", prompt, Sampling(temperature=0.8, max_tokens=40,
                                                                              n=3))))
        assert sorted(several.finish) == [0, 1, 2] and all(several.text.values())
    finally:
        asyncio.run(eng.close())


# -- conversation KV reuse (the prefix cache) ----------------------------------------------------
SYSTEM = ("You are Colloquy, a helpful assistant. Answer briefly and kindly, say so when you do not "
          "know, and never make up facts about people or places.")
QUESTIONS = ["Tell me a story about the sea.", "What happened to the sailor next?",
             "Did the storm ever end?", "How does the story finish?"]


def chat(turns: list[tuple[str, str]], new: str) -> str:
    """ChatML like the prompt service's: a hidden reminder only on the newest user message."""
    out = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for user, answer in turns:
        out += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    return out + f"<|im_start|>user\n{new}\n(Reminder: stay brief.)<|im_end|>\n<|im_start|>assistant\n"


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def hits() -> float:
    return metric("colloquy_generation_prefix_cache_lookups_total", result="hit")


def misses() -> float:
    return metric("colloquy_generation_prefix_cache_lookups_total", result="miss")


GREEDY = Sampling(temperature=0, max_tokens=24)
REUSED = "colloquy_generation_prefix_cache_reused_tokens_total"


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=0.9, top_p=0.9, max_tokens=24, seed=11),
                                      Sampling(temperature=1.0, max_tokens=24)],
                         ids=["greedy", "seeded", "derived-seed"])
def test_reused_turn_equals_a_fresh_generator(engine, sampling: Sampling) -> None:
    """Turns 2..4 continue the kept KV cache (hits) and give exactly the tokens a fresh prefill gives."""
    cached, fresh = engine(), engine()
    turns: list[tuple[str, str]] = []
    for t, question in enumerate(QUESTIONS):
        prompt = chat(turns, question)
        rid = f"r-{sampling.temperature}-{t}"
        h, m = hits(), misses()
        prefilled, reused = metric("colloquy_generation_prompt_tokens_total"), metric(REUSED)
        a = asyncio.run(collect(cached, Request(rid, prompt, sampling, conversation_id="conv-reuse")))
        assert (hits() - h, misses() - m) == ((1, 0) if t else (0, 1))
        n_prompt, reused = a.deltas[0].prompt_tokens, metric(REUSED) - reused
        # Only the tail after the common prefix was prefilled; the prefix ends where the previous
        # user message lost its reminder, so from turn 3 on most of the conversation is reused.
        assert metric("colloquy_generation_prompt_tokens_total") - prefilled == n_prompt - reused
        assert reused == 0 if not t else reused > (n_prompt / 2 if t >= 2 else 30)
        b = asyncio.run(collect(fresh, Request(rid, prompt, sampling, conversation_id=f"conv-fresh-{t}")))
        assert a.text == b.text and a.tokens == b.tokens and a.finish == b.finish
        # Token ids, not only text: both engines kept their Generator's whole sequence.
        assert cached._kept["conv-reuse"].ids == fresh._kept[f"conv-fresh-{t}"].ids
        turns.append((question, a.text[0]))
    assert cached.stats()["prefix_cache_conversations"] == 1


def test_prefix_cache_is_bounded_lru(engine) -> None:
    eng = engine(prefix_cache_conversations=2)
    for c in ("c1", "c2", "c3"):
        asyncio.run(collect(eng, Request(f"{c}-1", chat([], QUESTIONS[0]), GREEDY, conversation_id=c)))
    assert list(eng._kept) == ["c2", "c3"] and eng.stats()["prefix_cache_conversations"] == 2
    h = hits()
    asyncio.run(collect(eng, Request("c2-2", chat([(QUESTIONS[0], "Once upon a time.")], QUESTIONS[1]), GREEDY,
                                     conversation_id="c2")))
    assert hits() - h == 1 and list(eng._kept) == ["c3", "c2"]  # c2 is now the most recent
    m = misses()
    asyncio.run(collect(eng, Request("c1-2", chat([(QUESTIONS[0], "Once upon a time.")], QUESTIONS[1]), GREEDY,
                                     conversation_id="c1")))
    assert misses() - m == 1 and list(eng._kept) == ["c2", "c1"]  # c1 was evicted; c3 is now the LRU one
    # The token cap counts allocated KV positions (max_length): a small cap keeps nothing.
    small = engine(prefix_cache_max_tokens=100)
    asyncio.run(collect(small, Request("s-1", chat([], QUESTIONS[0]), GREEDY, conversation_id="s")))
    assert small.stats()["prefix_cache_conversations"] == 0
    assert eng.stats()["prefix_cache_tokens"] == sum(k.capacity for k in eng._kept.values()) > 0


def test_prefix_cache_only_for_single_candidate_conversations(engine) -> None:
    eng = engine()
    asyncio.run(collect(eng, Request("a", chat([], QUESTIONS[0]), GREEDY)))  # no conversation id
    asyncio.run(collect(eng, Request("b", chat([], QUESTIONS[0]), sample(10, n=2), conversation_id="multi")))
    assert eng.stats()["prefix_cache_conversations"] == 0
    off = engine(prefix_cache_conversations=0)
    asyncio.run(collect(off, Request("c", chat([], QUESTIONS[0]), GREEDY, conversation_id="c")))
    assert off.stats()["prefix_cache_conversations"] == 0


def test_prefix_cache_misses_start_fresh(engine) -> None:
    """Another prompt, a longer answer than the kept Generator has room for: fresh, same answer."""
    eng, ref = engine(prefix_cache_reserve_tokens=0), engine(prefix_cache_conversations=0)
    asyncio.run(collect(eng, Request("x-1", chat([], QUESTIONS[0]), GREEDY, conversation_id="x")))
    short = "<|im_start|>user\nSomething else entirely.<|im_end|>\n<|im_start|>assistant\n"
    m = misses()
    out = asyncio.run(collect(eng, Request("x-2", short, GREEDY, conversation_id="x")))
    assert misses() - m == 1
    assert out.text == asyncio.run(collect(ref, Request("x-2", short, GREEDY))).text
    # Room for prompt + max_tokens, twice (no reserve): a turn asking for far more does not fit.
    asyncio.run(collect(eng, Request("y-1", chat([], QUESTIONS[0]), GREEDY, conversation_id="y")))
    long_turn = Sampling(temperature=0, max_tokens=400)
    prompt = chat([(QUESTIONS[0], "Once.")], QUESTIONS[1])
    m, h = misses(), hits()
    out = asyncio.run(collect(eng, Request("y-2", prompt, long_turn, conversation_id="y")))
    assert (misses() - m, hits() - h) == (1, 0)
    assert out.text == asyncio.run(collect(ref, Request("y-2", prompt, long_turn))).text


def test_prefix_cache_dropped_on_model_switch_and_close(engine, tiny_model_dir: Path) -> None:
    eng = engine()
    asyncio.run(collect(eng, Request("m-1", chat([], QUESTIONS[0]), GREEDY, conversation_id="m")))
    assert eng.stats()["prefix_cache_conversations"] == 1
    asyncio.run(eng.load_version(tiny_model_dir, "tiny-v2"))
    assert eng.stats()["prefix_cache_conversations"] == 0
    m = misses()
    res = asyncio.run(collect(eng, Request("m-2", chat([(QUESTIONS[0], "Hm.")], QUESTIONS[1]), GREEDY,
                                           conversation_id="m")))
    assert misses() - m == 1 and {d.model_version for d in res.deltas} == {"tiny-v2"}
    assert eng.stats()["prefix_cache_conversations"] == 1
    asyncio.run(eng.close())
    assert eng.stats()["prefix_cache_conversations"] == 0 and eng.stats()["prefix_cache_tokens"] == 0


def test_sample_token_and_common_prefix() -> None:
    import numpy as np

    logits = np.array([0.0, 5.0, 1.0, 4.9, -3.0], dtype=np.float32)
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    assert sample_token(logits, 1.0, 1.0, 1, rng()) == 1  # top_k 1 is greedy
    assert sample_token(logits, 1e-4, 1.0, 0, rng()) == 1  # a tiny temperature too
    assert sample_token(logits, 1.0, 0.01, 0, rng()) == 1  # and a tiny nucleus
    draws = [sample_token(logits, 1.0, 1.0, 2, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) == {1, 3}  # top_k 2 keeps the two best, both drawn
    assert draws == [sample_token(logits, 1.0, 1.0, 2, np.random.default_rng(s)) for s in range(200)]
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0


@pytest.mark.model
def test_real_model_reused_turns_match_fresh(real_model_dir: Path) -> None:
    """The served build: a 3-turn greedy conversation, later turns from the kept KV cache."""
    from model.chat_template import render_chatml

    cached = AsyncEngine(real_model_dir, "real", EngineConfig(max_running=2))
    fresh = AsyncEngine(real_model_dir, "real", EngineConfig(max_running=2, prefix_cache_conversations=0))
    try:
        messages: list[dict[str, str]] = []
        for t, q in enumerate(["What is the capital of France?", "And of Italy?", "Which one is bigger?"]):
            prompt = render_chatml([*messages, {"role": "user", "content": q}])
            h = hits()
            a = asyncio.run(collect(cached, Request(f"real-c{t}", prompt, GREEDY, conversation_id="real-conv")))
            assert hits() - h == (1 if t else 0)
            b = asyncio.run(collect(fresh, Request(f"real-c{t}", prompt, GREEDY, conversation_id="real-conv")))
            assert a.text == b.text and a.tokens == b.tokens
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a.text[0]}]
    finally:
        asyncio.run(cached.close())
        asyncio.run(fresh.close())
