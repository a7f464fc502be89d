"""The engine benchmark's ONNX Runtime GenAI contender on a GPU: ``python -m bench.gpu_engine``.

Needs CUDA (an NVIDIA driver and ``onnxruntime-genai-cuda``, which the serving dependencies
already are). Batch-1 decode tok/s and aggregate tok/s at 1..32 streams with the CUDA provider, on
``--model-dir`` (a CUDA build from ``make model MODEL_ARGS=--cuda`` is best) or the served model.
Without a GPU it says so and runs the same code on the CPU provider with tiny sizes, so the path
stays tested; ``--require-cuda`` makes that an error (exit 3) instead.
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
    p.add_argument("--model-dir", default="", help="ONNX GenAI model dir (default: the served model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream-repeats", type=int, default=3)
    p.add_argument("--streams", default="1,4,16,32")
    p.add_argument("--require-cuda", action="store_true")
    args = p.parse_args(argv)

    from services.generation.engine import cuda_device_count

    gpus = cuda_device_count()
    provider = "cuda" if gpus else "cpu"
    if not gpus:
        need = "bench.gpu_engine needs CUDA: no NVIDIA GPU/driver found (libcuda.so.1)"
        if args.require_cuda:
            print(need, file=sys.stderr)
            return 3
        print(f"{need}; running the CPU fallback with tiny sizes instead (not GPU figures)", file=sys.stderr)
        args.tokens, args.repeats, args.stream_repeats, args.streams = 8, 1, 1, "1,4"
    if args.model_dir:
        model_dir, version = args.model_dir, args.model_dir.rstrip("/").rsplit("/", 1)[-1]
    else:
        path, version = common.served_model()
        model_dir = str(path)
    streams = [int(s) for s in args.streams.split(",") if s]
    rec = Record("gpu_engine", {"provider": provider, "gpus": gpus, "model_dir": model_dir, "model_version": version,
                                "max_tokens": args.tokens, "repeats": args.repeats, "streams": streams,
                                "prompts": common.QUESTIONS})
    ort = engine.OrtGenai(model_dir, provider)
    ids = [ort.encode(common.chat_prompt(q)) for q in common.QUESTIONS]
    log(f"gpu_engine: ort-genai on {provider} ({version})")
    res: dict[str, Any] = {
        "single": engine.measure_single(lambda i: ort.single(ids[i], args.tokens), len(ids), args.repeats),
        "streams": engine.measure_streams(lambda n: ort.batch(ids[0], args.tokens, n), streams, args.stream_repeats)}
    rec.results[f"ort-genai-{provider}"] = res
    doc = rec.finish()
    s = res["single"]
    print(common.table([[f"ort-genai ({provider})", s["decode_tok_s"]["median"], s["ttft_ms"]["median"],
                         *(res["streams"][str(n)]["median"] for n in streams)]],
                       ["contender", "decode tok/s b1", "TTFT ms", *(f"agg@{n}" for n in streams)]))
    return 0 if doc else 1


if __name__ == "__main__":
    sys.exit(main())
