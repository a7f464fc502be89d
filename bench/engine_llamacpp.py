"""`python -m bench.engine_llamacpp [REPEATS]`: llama.cpp vs ONNX Runtime GenAI direct at batch 1.

The llama.cpp row of `make bench BENCH=engine`, on its own and in one process: ORT GenAI, then
llama.cpp (`llama-cpp-python` on the GGUF the model build came from), then ORT GenAI again to
show drift; greedy, 32 tokens, the engine benchmark's prompts and measurement
(`bench.engine.measure_single`). For when the full engine run is too long for a quiet window.
Writes bench/results/engine_llamacpp.json.
"""

from __future__ import annotations

import json
import os
import sys

from bench import common, engine

TOKENS = 32


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    model_dir, version = common.served_model()
    ort = engine.OrtGenai(str(model_dir))
    ids = [ort.encode(common.chat_prompt(q)) for q in common.QUESTIONS]
    out = {"benchmark": "engine-llamacpp", "model_version": version, "gguf": str(common.gguf_path()),
           "max_tokens": TOKENS, "repeats": repeats, "prompts": common.QUESTIONS,
           "loadavg_before": os.getloadavg()}
    llama = engine.LlamaCpp(os.cpu_count() or 2)
    out["ort-genai"] = engine.measure_single(lambda i: ort.single(ids[i], TOKENS), len(ids), repeats)
    out["llama.cpp"] = engine.measure_single(lambda i: llama.single(ids[i], TOKENS), len(ids), repeats)
    out["ort-genai-again"] = engine.measure_single(lambda i: ort.single(ids[i], TOKENS), len(ids), repeats)
    out["loadavg_after"] = os.getloadavg()
    ort_decode = (out["ort-genai"]["decode_tok_s"]["median"] + out["ort-genai-again"]["decode_tok_s"]["median"]) / 2
    out["ratio_llamacpp_vs_ort_decode"] = round(out["llama.cpp"]["decode_tok_s"]["median"] / ort_decode, 3)
    path = common.RESULTS / "engine_llamacpp.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for name in ("ort-genai", "llama.cpp", "ort-genai-again"):
        r = out[name]
        print(f"{name:16s} decode {r['decode_tok_s']['median']} tok/s  TTFT {r['ttft_ms']['median']} ms  "
              f"ITL p50 {r['itl_ms']['median']} ms")
    print(f"llama.cpp / ORT GenAI decode: {out['ratio_llamacpp_vs_ort_decode']} -> {path}")


if __name__ == "__main__":
    main()
