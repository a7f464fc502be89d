"""Benchmark: answer quality against speed of every CPU build, in one run (issue 14's measure).

``python -m bench model`` (or ``python bench/model_quality.py [--builds a,b] [--model-repeats 5]``) reads
the builds of ``make model`` (``<cache>/build/onnx/*``) and prints, for each: the quality gate's
score (``model.quality``, greedy, every question), the 16-question capitals quiz, how many greedy
answers equal the float32 build's, decode tok/s at batch 1 and prefill ms for a 200-token prompt,
with ratios against float32 and against the builder's int4. Writes
``bench/results/model_quality.json``.

Method: the gate is scored in this run for every build (``--cached-quality`` reuses the build's
results instead: the same code, deterministic greedy answers). Speed: one warm-up round dropped,
then builds measured round-robin within each round so background load hits them alike; decode is
64 tokens after a ~200-token chat (EOS ignored), prefill the time to the first token of exactly
200 prompt tokens; the median over rounds is reported, the best kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from model.build import SPEED_TOKENS, VARIANTS, interleaved_speed  # noqa: E402
from model.paths import build_dir  # noqa: E402
from model.quality import same_answers  # noqa: E402

NAME = "model_quality"
FP32 = "cpu-fp32"
BUILDER_INT4 = "cpu-int4-rtn-last-pruned"
DEFAULT_BUILDS = (FP32, BUILDER_INT4, "cpu-int4-gguf", "cpu-int4-gguf-f32act", "cpu-int4-gguf-lut")
PREFILL_TOKENS = 200
DECODE_TOKENS = SPEED_TOKENS


def add_args(p: Any) -> None:
    p.add_argument("--builds", default=",".join(DEFAULT_BUILDS), help="comma-separated build variants")
    p.add_argument("--model-repeats", type=int, default=5, help="timed rounds per build (after a warm-up)")
    p.add_argument("--cached-quality", action="store_true",
                   help="reuse the build's quality results instead of scoring again")


def _quality(name: str, path: Path, cached: bool) -> dict[str, Any]:
    from model.quality import run_quality

    cache = build_dir() / "quality" / name / "quality.json"
    if cached and cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    common.log(f"{NAME}: scoring {name} on the quality gate")
    return run_quality(path, provider="cpu")


def _speed(paths: dict[str, Path], repeats: int) -> dict[str, dict[str, Any]]:
    runs = interleaved_speed(paths, repeats, prefill_tokens=PREFILL_TOKENS)
    return {n: {"decode_tok_s": round(statistics.median(r["decode_tok_s"]), 1),
                "decode_tok_s_best": round(max(r["decode_tok_s"]), 1),
                "prefill_ms_200": round(statistics.median(r["prefill_ms"]), 1),
                "decode_samples": [round(x, 1) for x in r["decode_tok_s"]]} for n, r in runs.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n.strip() for n in args.builds.split(",") if n.strip()]
    paths = {n: build_dir() / "onnx" / n for n in names}
    missing = [n for n, p in paths.items() if not (p / "model.onnx").is_file()]
    if missing:
        raise SystemExit(f"builds {missing} are missing: run `make model` (MODEL_VARIANTS) first")
    rec = common.Record(NAME, {"builds": names, "repeats": args.model_repeats, "decode_tokens": DECODE_TOKENS,
                               "prefill_tokens": PREFILL_TOKENS, "cached_quality": args.cached_quality})
    quality = {n: _quality(n, p, args.cached_quality) for n, p in paths.items()}
    speed = _speed(paths, args.model_repeats)
    rows = []
    for n in names:
        q, s = quality[n], speed[n]
        same = same_answers(q, quality[FP32]) if FP32 in quality else None
        caps = q.get("capitals_16") or {}
        rec.results[n] = {"gate_score": q["score"], "gate_total": q["total"], "gate_pct": q.get("score_pct"),
                          "capitals_16": caps.get("score"), "same_greedy_answer_as_fp32": same,
                          "note": VARIANTS[n].note, **s}
    for n in names:
        r = rec.results[n]
        r["decode_vs_fp32"] = round(r["decode_tok_s"] / rec.results[FP32]["decode_tok_s"], 2) \
            if FP32 in rec.results else None
        r["decode_vs_builder_int4"] = round(r["decode_tok_s"] / rec.results[BUILDER_INT4]["decode_tok_s"], 2) \
            if BUILDER_INT4 in rec.results else None
        r["gate_points_vs_fp32"] = round(r["gate_pct"] - rec.results[FP32]["gate_pct"], 2) \
            if FP32 in rec.results else None
        rows.append([n, f"{r['gate_score']}/{r['gate_total']}", r["gate_pct"], r["gate_points_vs_fp32"],
                     f"{r['capitals_16']}/16", f"{r['same_greedy_answer_as_fp32']}/{r['gate_total']}",
                     r["decode_tok_s"], r["decode_vs_fp32"], r["decode_vs_builder_int4"], r["prefill_ms_200"]])
    print(common.table(rows, ["build", "gate", "%", "pts vs fp32", "capitals", "= fp32", "decode tok/s",
                              "x fp32", "x builder int4", "prefill ms (200 tok)"]))
    rec.finish()
    return rec.doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/model_quality.py", description=__doc__.splitlines()[0])
    add_args(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
