"""Colloquy's generation engine on a GPU: ``python -m bench.gpu_engine [--cpu]``.

Aggregate tok/s of ``services.generation.engine.AsyncEngine`` (continuous batching on plain ONNX
Runtime, KV slots on the device, IOBinding) at 1, 16 and 64 concurrent streams, greedy, EOS
ignored, the engine benchmark's three prompts in turn; ORT GenAI's static batch of the same size
beside it as the bound without join/leave (``--no-ort`` leaves it out). Then exactness on the
same provider (``--exact N``, 0 leaves it out): N quality-gate questions, greedy, answered one at a
time and all at once through 16 slots with prefix-cache hits, each against ORT GenAI's
``Generator`` at batch 1: how many are token-identical (float16 kernels may pick other tilings for
other batch sizes, so a GPU can differ where the CPU build is exact). Use a CUDA build
(``make model MODEL_ARGS=--cuda``: fp16, GroupQueryAttention runs on CUDA only in fp16/bf16) with
``--model-dir``; the default is the served model. Without a GPU it exits 3, unless ``--cpu`` runs
the same code on the CPU provider with small sizes (a smoke test, not GPU figures).
Writes ``bench/results/gpu_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench import common, engine
from bench.common import Record, log

# ORT GenAI 0.18's CUDA generator: "batch_size (64) must be in [1, 32]" (seen on an H200, 2026-12-04)
ORT_GENAI_MAX_BATCH = 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_engine", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="", help="ONNX model dir (default: the served model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--cpu", action="store_true", help="run on the CPU provider with small sizes (smoke test)")
    p.add_argument("--no-ort", action="store_true", help="leave out ORT GenAI's static batch")
    p.add_argument("--exact", type=int, default=32, help="prompts for the exactness count (0: none)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="the engine's prefill budget per decode gap (0: EngineSettings' default, 64)")
    args = p.parse_args(argv)

    from services.generation.engine import cuda_device_count

    gpus = cuda_device_count()
    if not gpus and not args.cpu:
        print("bench.gpu_engine needs CUDA: no NVIDIA GPU/driver found (libcuda.so.1); --cpu smoke-tests it",
              file=sys.stderr)
        return 3
    provider = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.tokens, args.repeats, args.streams, args.exact = min(args.tokens, 8), 1, "1,4", min(args.exact, 4)
    model_dir, version = (args.model_dir, args.model_dir.rstrip("/").rsplit("/", 1)[-1]) if args.model_dir \
        else (str(common.served_model()[0]), common.served_model()[1])
    streams = [int(s) for s in args.streams.split(",") if s]
    rec = Record("gpu_engine", {"provider": provider, "gpus": gpus, "model_dir": model_dir, "model_version": version,
                                "max_tokens": args.tokens, "repeats": args.repeats, "streams": streams,
                                "prefill_chunk": args.prefill_chunk or "default",
                                "prompts": common.QUESTIONS})
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    ce = engine.ColloquyEngine(model_dir, max(streams), provider, prefill_chunk=args.prefill_chunk)
    log(f"gpu_engine: colloquy-engine on {provider} ({version})")
    rates, itl = engine.measure_streams(lambda n: ce.batch(prompts, args.tokens, n), streams, args.repeats)
    rec.results["colloquy-engine"] = {"streams": rates, "itl_ms": itl}
    ce.close()
    if not args.no_ort:
        ort = engine.OrtGenai(model_dir, provider)
        ids = ort.encode(prompts[0])
        log(f"gpu_engine: ort-genai static batch on {provider}")
        ort_streams = [n for n in streams if n <= ORT_GENAI_MAX_BATCH]
        if len(ort_streams) < len(streams):
            rec.skip(f"ort-genai at {[n for n in streams if n not in ort_streams]} streams",
                     f"ORT GenAI refuses a batch over {ORT_GENAI_MAX_BATCH}")
        if ort_streams:
            rates, itl = engine.measure_streams(lambda n: ort.batch(ids, args.tokens, n), ort_streams, args.repeats)
            rec.results["ort-genai"] = {"streams": rates, "itl_ms": itl}
        del ort
    top = str(max(streams))
    rows: list[list[Any]] = [[name, *(r["streams"].get(str(n), {}).get("median", "-") for n in streams),
                              r["itl_ms"].get(top, {}).get("median", "-"), r["itl_ms"].get(top, {}).get("p99", "-")]
                             for name, r in rec.results.items()]
    if args.exact:
        log(f"gpu_engine: exactness on {provider}, {args.exact} prompts")
        rec.results["exactness"] = exactness(model_dir, provider, args.exact, min(args.tokens, 48))
    rec.finish()
    print(common.table(rows, ["contender", *(f"agg@{n} tok/s" for n in streams),
                              f"ITL@{max(streams)} p50 ms", "p99 ms"]))
    if args.exact:
        print(json.dumps(rec.results["exactness"]))
    return 0


def exactness(model_dir: str, provider: str, prompts: int, tokens: int) -> dict[str, Any]:
    """Greedy token ids of quality-gate questions: engine at batch 1 and batched vs ORT GenAI's Generator."""
    import asyncio

    import onnxruntime_genai as og

    from model.genai import reference_ids
    from model.quality_questions import QUESTIONS
    from services.generation.config import EngineSettings
    from services.generation.engine import AsyncEngine, Request, Sampling

    texts = [common.chat_prompt(q.prompt) for q in QUESTIONS[:prompts]]
    greedy = Sampling(temperature=0, repetition_penalty=1.0, copy_penalty=0.0, max_tokens=tokens)
    reqs = [Request(f"x{i}", t, greedy) for i, t in enumerate(texts)]

    def answers(eng: AsyncEngine, batch: list[Request]) -> list[list[int]]:
        async def one(req: Request) -> list[int]:
            stream = eng.submit(req)
            async for _ in stream:
                pass
            return [t for t in stream._job.cands[0].generated if t not in eng._model.eos]

        async def all_() -> list[list[int]]:
            return list(await asyncio.gather(*(one(r) for r in batch)))

        return asyncio.run(all_())

    model = og.Model(model_dir)
    b1 = AsyncEngine(model_dir, "exact", EngineSettings(max_running=1, prefix_cache_conversations=0,
                                                        provider=provider))
    eos = b1._model.eos
    ref = [[t for t in reference_ids(model, b1._model.encode(text), tokens, eos) if t not in eos] for text in texts]
    del model
    one_by_one = [answers(b1, [r])[0] for r in reqs]
    asyncio.run(b1.close())
    batched = AsyncEngine(model_dir, "exact", EngineSettings(max_running=16, max_waiting=len(reqs), provider=provider))
    together = answers(batched, reqs)
    cached = answers(batched, reqs[::-1])[::-1]  # every prompt's prefix cached now
    asyncio.run(batched.close())

    def same(a: list[list[int]], b: list[list[int]]) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    return {"prompts": len(reqs), "tokens": tokens, "batch1_eq_generator": same(one_by_one, ref),
            "batched_eq_batch1": same(together, one_by_one), "cached_eq_batch1": same(cached, one_by_one),
            "batched_eq_generator": same(together, ref)}


if __name__ == "__main__":
    sys.exit(main())
