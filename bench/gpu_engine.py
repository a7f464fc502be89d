"""Colloquy's generation engine on a GPU: ``python -m bench.gpu_engine [--cpu]``.

Aggregate tok/s of ``services.generation.engine.AsyncEngine`` (continuous batching on plain ONNX
Runtime, KV slots on the device, IOBinding) at 1, 16 and 64 concurrent streams, greedy, EOS
ignored, the engine benchmark's three prompts in turn; ORT GenAI's static batch of the same size
beside it as the bound without join/leave (``--no-ort`` leaves it out). Use a CUDA build
(``make model MODEL_ARGS=--cuda``: fp16, GroupQueryAttention runs on CUDA only in fp16/bf16) with
``--model-dir``; the default is the served model. Without a GPU it exits 3, unless ``--cpu`` runs
the same code on the CPU provider with small sizes (a smoke test, not GPU figures).
Writes ``bench/results/gpu_engine.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench import common, engine
from bench.common import Record, log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_engine", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="", help="ONNX model dir (default: the served model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--cpu", action="store_true", help="run on the CPU provider with small sizes (smoke test)")
    p.add_argument("--no-ort", action="store_true", help="leave out ORT GenAI's static batch")
    args = p.parse_args(argv)

    from services.generation.engine import cuda_device_count

    gpus = cuda_device_count()
    if not gpus and not args.cpu:
        print("bench.gpu_engine needs CUDA: no NVIDIA GPU/driver found (libcuda.so.1); --cpu smoke-tests it",
              file=sys.stderr)
        return 3
    provider = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.tokens, args.repeats, args.streams = min(args.tokens, 8), 1, "1,4"
    model_dir, version = (args.model_dir, args.model_dir.rstrip("/").rsplit("/", 1)[-1]) if args.model_dir \
        else (str(common.served_model()[0]), common.served_model()[1])
    streams = [int(s) for s in args.streams.split(",") if s]
    rec = Record("gpu_engine", {"provider": provider, "gpus": gpus, "model_dir": model_dir, "model_version": version,
                                "max_tokens": args.tokens, "repeats": args.repeats, "streams": streams,
                                "prompts": common.QUESTIONS})
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    ce = engine.ColloquyEngine(model_dir, max(streams), provider)
    log(f"gpu_engine: colloquy-engine on {provider} ({version})")
    rec.results["colloquy-engine"] = {"streams": engine.measure_streams(
        lambda n: ce.batch(prompts, args.tokens, n), streams, args.repeats)}
    ce.close()
    if not args.no_ort:
        ort = engine.OrtGenai(model_dir, provider)
        ids = ort.encode(prompts[0])
        log(f"gpu_engine: ort-genai static batch on {provider}")
        rec.results["ort-genai"] = {"streams": engine.measure_streams(
            lambda n: ort.batch(ids, args.tokens, n), streams, args.repeats)}
    rows: list[list[Any]] = [[name, *(r["streams"][str(n)]["median"] for n in streams)]
                             for name, r in rec.results.items()]
    rec.finish()
    print(common.table(rows, ["contender", *(f"agg@{n} tok/s" for n in streams)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
