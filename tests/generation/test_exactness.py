"""Exactness of the batching engine: greedy answers token-identical to ORT GenAI's Generator.

The reference is ORT GenAI's own `Generator` at batch 1 (whole prompt appended, then one token per
step, greedy). The engine must give the same tokens
- at batch 1 (one request at a time),
- in a batch: many requests at once through fewer slots, so rows of different lengths share decode
  passes and join, leave and get compacted between them, prompts prefilled in small chunks,
- with prefix-cache hits (a shared system message, conversations' earlier turns) and without.
That holds when every pass runs the model's own graph (GENERATION_FLOAT32_ROWS=0). With the float32
copy of a block-quantized build's weights (the default) answers may depart from it where the reference's
top tokens were a near tie, and only there (test_real_model_float32_copy_...).
Fast tests use the tiny random model; the `model`-marked ones the registry's served build.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from model.genai import ReferenceStep, reference_steps
from services.generation.config import EngineSettings
from services.generation.engine import AsyncEngine, Request, Sampling

SYSTEM = ("You are Colloquy, a helpful assistant. Answer briefly and kindly, say so when you do not know, "
          "and never make up facts about people or places.")
QUESTIONS = [
    "Tell me a story about the sea.", "What is the capital of France?", "Hi", "How do rainbows form?",
    "Give me three tips for learning to cook.", "Why is the sky blue?", "Write a haiku about autumn.",
    "What is 12 times 7?", "Name a famous painter.", "How do I boil an egg?", "What is a prime number?",
    "Translate 'good morning' into Spanish.", "Who wrote Hamlet?", "Explain gravity to a child.",
    "What should I pack for a beach holiday?", "Is a tomato a fruit?", "Suggest a name for a cat.",
    "What is the tallest mountain?", "How many legs does a spider have?", "Summarize the water cycle.",
    "What does a compiler do?", "Recommend a book for a long flight.",
]
FOLLOW_UPS = ["Tell me more.", "Can you say that in one sentence?"]
# Logits: the float32 copy and a quantized graph may choose differently where the top two are this close
# (the largest departure measured on 30 prompts was 0.10, test_real_model_float32_copy_... says where).
NEAR_TIE = 0.25


def chatml(turns: list[tuple[str, str]], new: str, system: bool = True) -> str:
    out = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if system else ""
    for user, answer in turns:
        out += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    return out + f"<|im_start|>user\n{new}<|im_end|>\n<|im_start|>assistant\n"


def prompts() -> list[str]:
    """22 first turns (half with the shared system message) and conversations' later turns."""
    first = [chatml([], q, system=i % 2 == 0) for i, q in enumerate(QUESTIONS)]
    later = [chatml([(QUESTIONS[i], "Sure."), *([(FOLLOW_UPS[0], "Well.")] if k else [])], FOLLOW_UPS[k])
             for i in range(4) for k in range(2)]
    return first + later


def answers(eng: AsyncEngine, reqs: list[Request]) -> list[list[int]]:
    """Generated ids without EOS (the engine reports tokens, not the EOS it stopped on)."""
    async def one(req: Request) -> list[int]:
        stream = eng.submit(req)
        async for _ in stream:
            pass
        return list(stream._job.cands[0].generated)

    async def all_() -> list[list[int]]:
        return list(await asyncio.gather(*(one(r) for r in reqs)))

    return asyncio.run(all_())


def strip_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def engines(model_dir: Path, slots: int, chunk: int, n: int, float32_rows: int,
            nocache: bool = True) -> list[AsyncEngine]:
    """Batch 1 (no prefix cache), `slots` slots with `chunk`-token prefill chunks and (`nocache`) the same
    without the prefix cache."""
    settings = {"float32_rows": float32_rows}
    out = [AsyncEngine(model_dir, "ref", EngineSettings(max_running=1, prefix_cache_conversations=0, **settings)),
           AsyncEngine(model_dir, "ref", EngineSettings(max_running=slots, prefill_chunk=chunk, max_waiting=n,
                                                        **settings))]
    if nocache:
        out.append(AsyncEngine(model_dir, "ref", EngineSettings(max_running=slots, prefill_chunk=chunk, max_waiting=n,
                                                                prefix_cache_conversations=0, **settings)))
    return out


def reference(model_dir: Path, eng: AsyncEngine, texts: list[str], max_tokens: int) -> list[list[ReferenceStep]]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    try:
        return [reference_steps(model, eng._model.encode(t), max_tokens, eng._model.eos) for t in texts]
    finally:
        del model


def greedy_requests(texts: list[str], max_tokens: int) -> list[Request]:
    greedy = Sampling(temperature=0, repetition_penalty=1.0, copy_penalty=0.0, max_tokens=max_tokens)
    return [Request(f"x{i}", t, greedy) for i, t in enumerate(texts)]


def check_exact(model_dir: Path, max_tokens: int, slots: int, chunk: int, texts: list[str] | None = None) -> None:
    """Every pass on the model's own graph (no float32 copy): batch 1, batched, cached and not == Generator."""
    texts = texts or prompts()
    eng_b1, eng_batch, eng_nocache = engines(model_dir, slots, chunk, len(texts), float32_rows=0)
    try:
        assert eng_batch._model.session_for(slots) is eng_batch._model.session
        eos = eng_b1._model.eos
        ref = [strip_eos([s.token for s in steps], eos) for steps in reference(model_dir, eng_b1, texts, max_tokens)]
        reqs = greedy_requests(texts, max_tokens)
        one_by_one = [answers(eng_b1, [r])[0] for r in reqs]
        assert one_by_one == ref  # batch 1 == ORT GenAI Generator
        batches = metric("colloquy_generation_batch_size_count")
        hits = metric("colloquy_generation_prefix_cache_hits_total")
        rows_sum = metric("colloquy_generation_batch_size_sum")
        together = answers(eng_batch, reqs)
        mean_rows = (metric("colloquy_generation_batch_size_sum") - rows_sum) / (
            metric("colloquy_generation_batch_size_count") - batches)
        assert mean_rows > slots / 2  # the rows really shared decode passes
        assert metric("colloquy_generation_prefix_cache_hits_total") > hits  # hits happened
        assert together == ref  # every row of a batch (with prefix-cache hits) == its batch-1 run
        assert answers(eng_batch, reqs[::-1]) == ref[::-1]  # all hits now, other order
        assert answers(eng_nocache, reqs) == ref  # misses only
    finally:
        for e in (eng_b1, eng_batch, eng_nocache):
            asyncio.run(e.close())


def check_departures(got: list[list[int]], ref: list[list[ReferenceStep]], eos: frozenset[int]) -> None:
    """Each answer that is not the reference's departs at a near tie: at its first other token the engine took
    one of the reference's next best tokens (an end token where it stopped), within NEAR_TIE of the chosen one."""
    for i, (ids, steps) in enumerate(zip(got, ref, strict=True)):
        want = strip_eos([s.token for s in steps], eos)
        if ids == want:
            continue
        both = min(len(ids), len(want))
        k = next((k for k in range(both) if ids[k] != want[k]), both)
        took = [ids[k]] if k < len(ids) else sorted(eos)  # the engine stopped at k: it took an end token
        gap = min(steps[k].gaps.get(t, float("inf")) for t in took)
        assert gap <= NEAR_TIE, f"prompt {i}, token {k}: {took} is not a near tie of the reference's {steps[k]}"


def test_check_departures_lets_only_near_ties_through() -> None:
    """The float32 test's judge: a departure to a close runner-up (or a stop where the end token was close)
    passes; one to a far or unlisted token, or a stop where the end token was far, fails."""
    eos = frozenset({0})
    ref = [[ReferenceStep(5, {6: 0.1, 7: 2.0, 0: 0.2}), ReferenceStep(8, {9: 0.05}), ReferenceStep(0, {8: 0.3})]]
    check_departures([[5, 8]], ref, eos)  # the reference itself (its end token stripped)
    check_departures([[6, 1, 1]], ref, eos)  # a near tie at the first token; what follows is not judged
    check_departures([[]], ref, eos)  # stopped at once: the end token was 0.2 below
    for far in ([[7]], [[5, 4]], [[5]]):  # 2.0 below; not among the next best; stopped where no end token was
        with pytest.raises(AssertionError, match="not a near tie"):
            check_departures(far, ref, eos)


def test_greedy_equals_ort_genai_generator_batched_and_cached(tiny_model_dir: Path) -> None:
    """30 prompts: batch 1, 6 slots with 8-token prefill chunks, cache hits and misses: all == Generator."""
    check_exact(tiny_model_dir, max_tokens=40, slots=6, chunk=8)


def test_sampled_answers_do_not_depend_on_cache_or_batch(tiny_model_dir: Path) -> None:
    """Seeded sampling (and repetition penalty, top_k per request): same ids alone, batched, cached."""
    texts = prompts()[:12]
    params = [Sampling(temperature=0.9, top_p=0.9, max_tokens=30, seed=i, top_k=None if i % 3 else 20,
                       repetition_penalty=1.0 if i % 2 else 1.3) for i in range(len(texts))]
    reqs = [Request(f"s{i}", t, p) for i, (t, p) in enumerate(zip(texts, params, strict=True))]
    alone = AsyncEngine(tiny_model_dir, "ref", EngineSettings(max_running=1, prefix_cache_conversations=0))
    batched = AsyncEngine(tiny_model_dir, "ref", EngineSettings(max_running=5, prefill_chunk=16))
    try:
        ref = [answers(alone, [r])[0] for r in reqs]
        assert answers(batched, reqs) == ref
        assert answers(batched, reqs) == ref  # every prefix cached now
        assert len({tuple(r) for r in ref}) == len(ref)
    finally:
        asyncio.run(alone.close())
        asyncio.run(batched.close())


def real_texts() -> list[str]:
    """16 of the prompts: 8 first turns (half with the system message) and the 8 later turns."""
    texts = prompts()
    return texts[:8] + texts[len(QUESTIONS):]


@pytest.mark.model
def test_real_model_greedy_equals_ort_genai_generator(real_model_dir: Path) -> None:
    """The served build on its own graph: the 16 real prompts, 24 tokens, batch 1 / 8 slots / cached ==
    Generator. The tiny model's test runs all 30 at 40 tokens."""
    check_exact(real_model_dir, max_tokens=24, slots=8, chunk=32, texts=real_texts())


@pytest.mark.model
def test_real_model_float32_copy_departs_from_generator_only_at_near_ties(real_model_dir: Path) -> None:
    """With the float32 copy (the default GENERATION_FLOAT32_ROWS=2: prompts of 2+ tokens and batched decode
    passes on float32 weights and activations) greedy answers equal the Generator's on the quantized graph
    except where its top two tokens were within NEAR_TIE: a child's 8-bit layers quantize activations to
    int8 (rlhf/export.py), which flips such near ties (measured 2026-12-07 on round 1's child: 9 of 30
    answers departed, margins 0.005-0.10; the base build departed on none)."""
    texts = real_texts()
    eng_b1, eng_batch = engines(real_model_dir, 8, 32, len(texts), float32_rows=2, nocache=False)
    try:
        model = eng_batch._model
        if model.float32_session is None:
            pytest.skip("the served build is not block-quantized: no float32 copy")
        assert model.session_for(2) is model.float32_session and model.session_for(1) is model.session
        assert eng_batch.stats()["float32_rows"] == 2  # what status() reports
        ref = reference(real_model_dir, eng_b1, texts, 24)
        reqs = greedy_requests(texts, 24)
        check_departures([answers(eng_b1, [r])[0] for r in reqs], ref, model.eos)
        check_departures(answers(eng_batch, reqs), ref, model.eos)
    finally:
        asyncio.run(eng_b1.close())
        asyncio.run(eng_batch.close())
