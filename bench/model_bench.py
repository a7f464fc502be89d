"""Benchmark: prefill and batch-1 decode speed of every ONNX build vs transformers ``generate()``.

Not a test. ``python bench/model_bench.py [--builds a,b] [--repeats 3] [--tokens 64]``
reads the builds of ``python -m model.build`` (``<cache>/build/onnx/*``), runs the
same prompts through ONNX Runtime GenAI and through transformers' float32
``generate()`` (greedy, batch 1, exactly ``--tokens`` new tokens), and writes
``bench/results/model.json`` plus a table with ratios against transformers.

Method: one warm-up round is dropped; engines run round-robin within each round
so background load hits them alike; prefill is the time to the first new token
(ORT: ``append_tokens`` + first token; transformers: a streamer timestamps the
first token), decode is the rest divided by ``tokens - 1``; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from model.build import VARIANTS, tool_versions  # noqa: E402
from model.chat_template import render_chatml  # noqa: E402
from model.paths import build_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "model.json"
TRANSFORMERS = "transformers-fp32"

_HISTORY = [
    ("I am planning a trip to Italy next spring and I would like some help with the itinerary.",
     "That sounds wonderful! Italy in spring is lovely: mild weather, fewer crowds than summer, "
     "and gardens in bloom. How many days do you have, and which cities interest you most?"),
    ("About ten days. I want to see Rome, Florence and maybe Venice, and I like food and museums.",
     "Ten days is a good amount of time for those three cities. A common plan is four days in "
     "Rome for the Colosseum, the Vatican Museums and Trastevere, three days in Florence for the "
     "Uffizi, the Duomo and a day trip to Tuscany's wine country, and two or three days in Venice "
     "for St Mark's Square, the Doge's Palace and the islands of Murano and Burano."),
    ("How should I travel between the cities?",
     "High-speed trains are the easiest option. Rome to Florence takes about 1.5 hours and "
     "Florence to Venice about 2 hours. Book a few weeks ahead for the best fares, and remember "
     "to validate regional tickets before boarding."),
]


def prompts() -> dict[str, list[dict[str, str]]]:
    """Short (one question), medium and long (multi-turn history) conversations."""
    long_history: list[dict[str, str]] = [
        {"role": "system", "content": "You are a helpful travel assistant. Be concise and concrete."}]
    for user, assistant in _HISTORY * 2:
        long_history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
    long_history.append({"role": "user", "content": "What should I eat in each city?"})
    medium = [*long_history[:5], long_history[-1]]
    return {
        "short": [{"role": "user", "content": "What is the capital of France?"}],
        "medium": medium,
        "long": long_history,
    }


class OrtEngine:
    """One ONNX Runtime GenAI build on the CPU provider."""

    def __init__(self, model_dir: Path) -> None:
        from model.genai import load

        self.model, self.tokenizer = load(model_dir, "cpu")

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def run(self, ids: list[int], tokens: int) -> tuple[float, float, str]:
        """(prefill seconds, decode seconds, text) for exactly ``tokens`` new tokens."""
        from model.genai import greedy

        gen = greedy(self.model, self.tokenizer, ids, tokens, stop_at_eos=False)
        if gen.new_tokens != tokens:
            raise RuntimeError(f"expected {tokens} tokens, got {gen.new_tokens}")
        return gen.prefill_s, gen.decode_s, gen.text


class TransformersEngine:
    """transformers ``generate()`` on the float32 checkpoint the ONNX builds came from."""

    def __init__(self, hf_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def run(self, ids: list[int], tokens: int) -> tuple[float, float, str]:
        stamps: list[float] = []
        input_ids = self.torch.tensor([ids])
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids),
                                      max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False, streamer=common.token_clock(stamps), pad_token_id=2)
            end = time.perf_counter()
        new = out.shape[1] - len(ids)
        if new != tokens:
            raise RuntimeError(f"expected {tokens} tokens, got {new}")
        first = stamps[1]  # stamps[0] is the prompt being pushed
        return first - start, end - first, ""


def bench(engines: dict[str, Callable[[list[int], int], tuple[float, float, str]]],
          encoded: dict[str, list[int]], tokens: int, repeats: int) -> dict[str, Any]:
    """Round-robin timing; returns per-engine, per-prompt medians."""
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        e: {p: {"prefill": [], "decode": []} for p in encoded} for e in engines}
    for round_ in range(repeats + 1):
        for prompt, ids in encoded.items():
            for name, run in engines.items():
                prefill_s, decode_s, _ = run(ids, tokens)
                if round_ == 0:
                    continue  # warm-up
                samples[name][prompt]["prefill"].append(len(ids) / prefill_s)
                samples[name][prompt]["decode"].append((tokens - 1) / decode_s)
        print(f"round {round_}/{repeats} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    results: dict[str, Any] = {}
    for name, per_prompt in samples.items():
        results[name] = {
            "prefill_tok_s": {p: round(statistics.median(v["prefill"]), 1)
                              for p, v in per_prompt.items()},
            "decode_tok_s": {p: round(statistics.median(v["decode"]), 1)
                             for p, v in per_prompt.items()},
            "decode_tok_s_median": round(statistics.median(
                x for v in per_prompt.values() for x in v["decode"]), 1),
        }
    return results


def table(results: dict[str, Any], lengths: dict[str, int]) -> str:
    """Human-readable table with speed ratios against transformers."""
    ref = results[TRANSFORMERS]
    head = ["engine"] + [f"prefill {p} ({n} tok)" for p, n in lengths.items()] + [
        "decode tok/s", "decode vs tf"]
    rows = [head]
    for name, r in results.items():
        row = [name]
        for p in lengths:
            ratio = r["prefill_tok_s"][p] / ref["prefill_tok_s"][p]
            row.append(f"{r['prefill_tok_s'][p]:.0f} ({ratio:.1f}x)")
        row.append(f"{r['decode_tok_s_median']:.1f}")
        row.append(f"{r['decode_tok_s_median'] / ref['decode_tok_s_median']:.1f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))) for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``bench/results/model.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--builds", default=None,
                        help="comma-separated build names (default: every CPU build present)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads for transformers (default: torch's own)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = (args.build_dir or build_dir()).resolve()
    onnx_root = root / "onnx"
    names = ([n.strip() for n in args.builds.split(",")] if args.builds else sorted(
        p.name for p in onnx_root.iterdir()
        if (p / "genai_config.json").is_file()
        and VARIANTS.get(p.name) is not None and VARIANTS[p.name].execution_provider == "cpu"))
    if not names:
        print(f"no builds under {onnx_root}: run `python -m model.build` first", file=sys.stderr)
        return 1
    engines: dict[str, Callable[[list[int], int], tuple[float, float, str]]] = {}
    transformers = TransformersEngine(root / "hf-fp32")
    if args.torch_threads > 0:
        transformers.torch.set_num_threads(args.torch_threads)
    engines[TRANSFORMERS] = transformers.run
    ort = {n: OrtEngine(onnx_root / n) for n in names}
    engines.update({f"onnx {n}": e.run for n, e in ort.items()})
    first = next(iter(ort.values()))
    encoded = {p: first.encode(render_chatml(m)) for p, m in prompts().items()}
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = bench(engines, encoded, args.tokens, args.repeats)
    report = {
        "method": __doc__.split("\n\n")[2].replace("\n", " "),
        "tokens": args.tokens, "repeats": args.repeats,
        "prompt_tokens": {p: len(ids) for p, ids in encoded.items()},
        "machine": {"platform": platform.platform(), "processor": common.cpu_model(),
                    "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "tools": tool_versions(),
        "torch_threads": transformers.torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "ratios_vs_transformers": {
            name: {"decode": round(r["decode_tok_s_median"]
                                   / results[TRANSFORMERS]["decode_tok_s_median"], 2),
                   **{f"prefill_{p}": round(r["prefill_tok_s"][p]
                                            / results[TRANSFORMERS]["prefill_tok_s"][p], 2)
                      for p in encoded}}
            for name, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(results, report["prompt_tokens"]))
    print(f"(load average {report['machine']['loadavg_before'][0]} -> "
          f"{report['machine']['loadavg_after'][0]} on {os.cpu_count()} CPUs; wrote {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
