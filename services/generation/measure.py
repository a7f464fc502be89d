"""Measure decode speed of the ways ORT GenAI can serve concurrent streams on this machine.

`python -m services.generation.measure MODEL_DIR [--tokens 128] [--streams 4]` prints one JSON line
per contender: one `og.Generator` alone, N Generators stepped round-robin, one Generator holding a
batch of N rows, `og.Engine` (static batch on CPU) with 1 and N requests, and this package's
`AsyncEngine` with 1 and N streams. The engine backend was chosen from these numbers (see
engine.py's docstring); rerun it after changing the model build or the scheduler.

Greedy decoding of a fixed number of tokens (EOS masked with min_length) so every contender does
the same work; the first token (prefill) is excluded from decode tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _best(fn: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    fn()  # warm-up, excluded
    runs = [fn() for _ in range(repeats)]
    return max(runs, key=lambda r: r["decode_tok_s"])


def generators_round_robin(model: Any, ids: list[int], tokens: int, streams: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    gens = []
    for _ in range(streams):
        p = og.GeneratorParams(model)
        total = len(ids) + tokens
        p.set_search_options(max_length=total, min_length=total, do_sample=False)
        gens.append(og.Generator(model, p))
    for g in gens:
        g.append_tokens(ids)
        g.generate_next_token()
    start = time.perf_counter()
    steps = 0
    while not all(g.is_done() for g in gens):
        for g in gens:
            if not g.is_done():
                g.generate_next_token()
                steps += 1
    wall = time.perf_counter() - start
    return {"decode_tok_s": steps / wall, "tokens": steps + streams}


def generator_batch(model: Any, ids: list[int], tokens: int, streams: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    p = og.GeneratorParams(model)
    total = len(ids) + tokens
    p.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=streams)
    g = og.Generator(model, p)
    g.append_tokens(np.asarray([ids] * streams, dtype=np.int32))
    g.generate_next_token()
    start = time.perf_counter()
    steps = 0
    while not g.is_done():
        g.generate_next_token()
        steps += streams
    wall = time.perf_counter() - start
    return {"decode_tok_s": steps / wall, "tokens": steps + streams}


def og_engine(model: Any, ids: list[int], tokens: int, streams: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    engine = og.Engine(model)
    buf = engine.create_event_buffer(64)
    reqs = []
    for _ in range(streams):
        r = engine.create_request()
        opts = og.TurnOptions(r)
        opts.set_max_generated_tokens(tokens)
        opts.set_min_generated_tokens(tokens)
        opts.set_temperature(0.0)
        r.begin_turn(np.asarray(ids, dtype=np.int32), opts)
        reqs.append(r)
    count = 0
    first = None
    while engine.has_pending_requests():
        buf = engine.run(buf)
        for i in range(len(buf)):
            if int(buf[i].flags) & int(og.EngineEventFlags.TOKEN):
                count += 1
        if first is None and count >= streams:
            first, base = time.perf_counter(), count
    wall = time.perf_counter() - (first or time.perf_counter())
    for r in reqs:
        r.close()
    return {"decode_tok_s": (count - base) / wall if first else 0.0, "tokens": count,
            "configured_max_batch_size": engine.get_capabilities().configured_max_batch_size}


async def _async_engine(model_dir: str, tokens: int, streams: int, repeats: int,
                        candidates: int = 1) -> dict[str, Any]:
    from services.generation.config import EngineSettings
    from services.generation.engine import AsyncEngine, Request, Sampling

    eng = AsyncEngine(model_dir, "measure", EngineSettings(max_running=max(streams * candidates, 1)))
    # Sampling with EOS suppressed is not offered, so candidates > 1 sample (their rows differ) and
    # may stop early; decode tok/s counts the tokens really produced.
    params = Sampling(temperature=0 if candidates == 1 else 0.7, repetition_penalty=1.0, max_tokens=tokens,
                      n=candidates)

    async def one(rid: str) -> tuple[int, float, float]:
        n, first, last = 0, 0.0, 0.0
        async for deltas in eng.submit(Request(rid, PROMPT, params)):
            for d in deltas:
                if d.tokens:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += d.tokens
        return n, first, last

    best: dict[str, Any] = {}
    try:
        for r in range(repeats + 1):
            res = await asyncio.gather(*(one(f"m{r}-{i}") for i in range(streams)))
            total = sum(n for n, _, _ in res) - streams * candidates
            first = max(f for _, f, _ in res)
            last = max(last for _, _, last in res)
            out = {"decode_tok_s": total / (last - first) if last > first else 0.0,
                   "tokens": total + streams * candidates}
            if r and out["decode_tok_s"] > best.get("decode_tok_s", 0):
                best = out
    finally:
        await eng.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated contender names")
    args = ap.parse_args()

    import onnxruntime_genai as og

    config = og.Config(args.model_dir)
    config.clear_providers()
    model = og.Model(config)
    tok = og.Tokenizer(model)
    ids = [int(t) for t in tok.encode(PROMPT)]
    n = args.streams
    contenders: dict[str, Callable[[], dict[str, Any]]] = {
        "generator_x1": lambda: generators_round_robin(model, ids, args.tokens, 1),
        f"generator_round_robin_x{n}": lambda: generators_round_robin(model, ids, args.tokens, n),
        f"generator_batch_x{n}": lambda: generator_batch(model, ids, args.tokens, n),
        "og_engine_x1": lambda: og_engine(model, ids, args.tokens, 1),
        f"og_engine_x{n}": lambda: og_engine(model, ids, args.tokens, n),
    }
    only = {s for s in args.only.split(",") if s}
    for name, fn in contenders.items():
        if only and name not in only:
            continue
        try:
            res = _best(fn, args.repeats)
        except Exception as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"contender": name, "prompt_tokens": len(ids), **res}), flush=True)
    for streams, candidates in ((1, 1), (n, 1), (1, n)):
        name = f"async_engine_x{streams}" if candidates == 1 else f"async_engine_n{candidates}"
        if only and name not in only:
            continue
        res = asyncio.run(_async_engine(args.model_dir, args.tokens, streams, args.repeats, candidates))
        print(json.dumps({"contender": name, "prompt_tokens": len(ids), **res}), flush=True)


if __name__ == "__main__":
    main()
