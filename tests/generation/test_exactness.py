"""Exactness of the batching engine: greedy answers token-identical to ORT GenAI's Generator.

The reference is ORT GenAI's own `Generator` at batch 1 (whole prompt appended, then one token per
step, greedy). The engine must give the same tokens
- at batch 1 (one request at a time),
- in a batch: many requests at once through fewer slots, so rows of different lengths share decode
  passes and join, leave and get compacted between them, prompts prefilled in small chunks,
- with prefix-cache hits (a shared system message, conversations' earlier turns) and without.
Fast tests use the tiny random model; the `model`-marked ones the registry's served build.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from model.genai import reference_ids
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


def check_exact(model_dir: Path, max_tokens: int, slots: int, chunk: int, float32_copy: bool = False,
                texts: list[str] | None = None) -> None:
    """`float32_copy`: the model is block-quantized, so batched decode passes run on the float32
    copy of its weights (runner.LoadedModel.float32_session) while batch 1 keeps the quantized graph."""
    import onnxruntime_genai as og

    texts = texts or prompts()
    eng_b1 = AsyncEngine(model_dir, "ref", EngineSettings(max_running=1, prefix_cache_conversations=0))
    eng_batch = AsyncEngine(model_dir, "ref", EngineSettings(max_running=slots, prefill_chunk=chunk,
                                                             max_waiting=len(texts)))
    eng_nocache = AsyncEngine(model_dir, "ref", EngineSettings(max_running=slots, prefill_chunk=chunk,
                                                               max_waiting=len(texts), prefix_cache_conversations=0))
    try:
        model = og.Model(str(model_dir))
        eos = eng_b1._model.eos
        assert eng_b1._model.session_for(1) is eng_b1._model.session
        assert (eng_batch._model.session_for(2) is not eng_batch._model.session) == float32_copy
        assert (eng_batch.stats()["float32_rows"] == 2) == float32_copy  # what status() reports
        ids = [eng_b1._model.encode(t) for t in texts]
        ref = [strip_eos(reference_ids(model, i, max_tokens, eos), eos) for i in ids]
        del model
        greedy = Sampling(temperature=0, repetition_penalty=1.0, copy_penalty=0.0, max_tokens=max_tokens)
        reqs = [Request(f"x{i}", t, greedy) for i, t in enumerate(texts)]
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


@pytest.mark.model
def test_real_model_greedy_equals_ort_genai_generator(real_model_dir: Path) -> None:
    """The served build: 16 of the prompts (8 first turns, half with the system message, and the 8
    later turns), 24 tokens, batch 1 / 8 slots (passes of 2+ rows on the float32 copy of the
    weights) / cached == Generator. The tiny model's test runs all 30 at 40 tokens."""
    texts = prompts()
    check_exact(real_model_dir, max_tokens=24, slots=8, chunk=32, float32_copy=True,
                texts=texts[:8] + texts[len(QUESTIONS):])
