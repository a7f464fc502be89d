"""Engine benchmark: decode tok/s at batch 1 and aggregate tok/s at 1..32 concurrent streams.

Contenders, all on the served model's weights (registry pointer "generation"):
- ``colloquy-engine``: the generation engine itself (``services.generation.engine.AsyncEngine``:
  continuous batching on plain ONNX Runtime) in this process, no Ray, no gRPC; N streams are N
  concurrent requests over the three prompts in turn (rows of different lengths), prefix cache off;
- ``colloquy``: the generation deployment (Ray Serve gRPC ``GenerationService/Generate``), started
  alone (``python -m services.generation`` with ``KAFKA_WORKER=false``) and called over gRPC;
- ``ort-genai``: ONNX Runtime GenAI in this process on the same ONNX build (one ``Generator``; N
  streams are N batch rows of one Generator: a static batch, the bound without join/leave);
- ``transformers``: ``generate()`` on the float32 HF checkpoint the builds came from (N streams: a
  batch of N rows);
- ``llama.cpp``: ``llama-cpp-python`` on the GGUF the build came from (batch 1 only: its Python
  API has no multi-sequence generate).

Method: greedy, the same prompts and max_tokens for everyone; the in-process contenders are pinned
to exactly max_tokens (EOS masked; the engine with ``ignore_eos``), the deployment stops at EOS
like in production (its token counts are in the JSON). One warm-up run per contender is dropped
(at batch 1, and before the stream counts). Batch-1 decode tok/s excludes the first token
(prefill); aggregate tok/s is all new tokens over the wall-clock time from the first request to
the last token. ``ort-genai`` and ``colloquy-engine`` take turns run by run (on a shared machine
the load moves within a minute). In-process contenders run before the deployment starts, so Ray's
processes do not compete with them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Record, log, summary

NAME = "engine"
STREAMS = (1, 4, 16)
EOS = 2  # <|im_end|> / </s> of SmolLM2


# -- one timed generation --------------------------------------------------------------------------
def _stamps_result(n_prompt: int, start: float, stamps: list[float], counts: list[int] | None = None
                   ) -> dict[str, Any]:
    """Batch-1 figures from the wall-clock stamp of each arrival of new tokens.

    ``counts[i]`` tokens arrived at ``stamps[i]`` (1 each in process; the deployment coalesces a
    stream interval's tokens into one message): decode tok/s and inter-token latency are spread
    evenly over the tokens of each arrival.
    """
    counts = counts or [1] * len(stamps)
    total = sum(counts)
    decode = stamps[-1] - stamps[0]
    itl = [(b - a) / n for a, b, n in zip(stamps, stamps[1:], counts[1:], strict=False) for _ in range(n)]
    return {"prompt_tokens": n_prompt, "tokens": total, "ttft_s": stamps[0] - start,
            "decode_tok_s": (total - counts[0]) / decode if decode > 0 else 0.0, "itl_s": itl}


class OrtGenai:
    """ONNX Runtime GenAI used directly, one process, CPU provider (or ``provider``)."""

    name = "ort-genai"

    def __init__(self, model_dir: str, provider: str = "cpu") -> None:
        from model.genai import load

        self.model, self.tokenizer = load(model_dir, provider)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def single(self, ids: list[int], tokens: int) -> dict[str, Any]:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        total = len(ids) + tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        stamps: list[float] = []
        start = time.perf_counter()
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return _stamps_result(len(ids), start, stamps)

    def batch(self, ids: list[int], tokens: int, streams: int) -> int:
        """N rows of one Generator; returns the tokens generated."""
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        total = len(ids) + tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=streams)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([ids] * streams, dtype=np.int32))
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        return steps * streams


class ColloquyEngine:
    """Colloquy's batching engine in this process (AsyncEngine), prefix cache off, EOS ignored."""

    name = "colloquy-engine"

    def __init__(self, model_dir: str, max_running: int, provider: str = "cpu", prefix_cache: bool = False) -> None:
        from services.generation.engine import AsyncEngine, EngineConfig

        self.engine = AsyncEngine(model_dir, "bench", EngineConfig(
            max_running=max_running, max_waiting=1024, provider=provider,
            prefix_cache_conversations=16 if prefix_cache else 0))

    async def _one(self, prompt: str, tokens: int) -> dict[str, Any]:
        from services.generation.engine import Request, Sampling

        req = Request(f"bench-{uuid.uuid4().hex}", prompt, Sampling(
            temperature=0.0, repetition_penalty=1.0, max_tokens=tokens, ignore_eos=True))
        start = time.perf_counter()
        stamps: list[float] = []
        counts: list[int] = []
        async for deltas in self.engine.submit(req):
            n = sum(d.tokens for d in deltas)
            if n:
                stamps.append(time.perf_counter())
                counts.append(n)
        return {"start": start, "stamps": stamps, "counts": counts}

    def single(self, prompt: str, n_prompt: int, tokens: int) -> dict[str, Any]:
        r = asyncio.run(self._one(prompt, tokens))
        return _stamps_result(n_prompt, r["start"], r["stamps"], r["counts"])

    def batch(self, prompts: list[str], tokens: int, streams: int) -> int:
        async def go() -> int:
            runs = await asyncio.gather(*(self._one(prompts[i % len(prompts)], tokens) for i in range(streams)))
            return sum(sum(r["counts"]) for r in runs)

        return asyncio.run(go())

    def close(self) -> None:
        asyncio.run(self.engine.close())


class Transformers:
    """transformers ``generate()`` on the float32 checkpoint."""

    name = "transformers"

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(common.hf_dir()), dtype=torch.float32).eval()

    def _generate(self, ids: list[int], tokens: int, streams: int, streamer: Any = None) -> int:
        inputs = self.torch.tensor([ids] * streams)
        with self.torch.inference_mode():
            out = self.model.generate(inputs, attention_mask=self.torch.ones_like(inputs), max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, streamer=streamer, pad_token_id=EOS)
        return (out.shape[1] - len(ids)) * streams

    def single(self, ids: list[int], tokens: int) -> dict[str, Any]:
        stamps: list[float] = []
        start = time.perf_counter()
        self._generate(ids, tokens, 1, common.token_clock(stamps))
        return _stamps_result(len(ids), start, stamps[1:])

    def batch(self, ids: list[int], tokens: int, streams: int) -> int:
        return self._generate(ids, tokens, streams)


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the GGUF (Q4_1)."""

    name = "llama.cpp"

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(common.gguf_path()), n_ctx=2048, n_threads=threads,
                         n_threads_batch=threads, verbose=False, seed=0)

    def single(self, ids: list[int], tokens: int) -> dict[str, Any]:
        self.llm.reset()
        stamps: list[float] = []
        start = time.perf_counter()
        for _ in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True,
                                   logits_processor=[_ban_eos]):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens:
                break
        return _stamps_result(len(ids), start, stamps)


def _ban_eos(_ids: Any, logits: Any) -> Any:
    logits[EOS] = -float("inf")
    return logits


# -- the deployment over gRPC ----------------------------------------------------------------------
class Deployment:
    """Colloquy's generation deployment: Ray Serve's gRPC proxy, one aio channel."""

    name = "colloquy"

    def __init__(self, target: str) -> None:
        self.target = target

    async def _one(self, stub: Any, prompt: str, tokens: int) -> dict[str, Any]:
        from colloquy.v1 import common_pb2, generation_pb2

        req = generation_pb2.GenerateRequest(
            prompt=prompt, request_id=f"bench-{uuid.uuid4().hex}",
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens))
        md = (("session_id", req.request_id),)
        start = time.perf_counter()
        stamps: list[float] = []
        counts: list[int] = []
        async for msg in stub.Generate(req, metadata=md, timeout=600):
            if msg.delta_tokens:
                stamps.append(time.perf_counter())
                counts.append(msg.delta_tokens)
        return {"start": start, "stamps": stamps, "counts": counts}

    def single(self, prompt: str, n_prompt: int, tokens: int) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            import grpc
            from colloquy.v1 import generation_pb2_grpc

            async with grpc.aio.insecure_channel(self.target) as ch:
                r = await self._one(generation_pb2_grpc.GenerationServiceStub(ch), prompt, tokens)
            return _stamps_result(n_prompt, r["start"], r["stamps"], r["counts"])

        return asyncio.run(go())

    def batch(self, prompt: str, tokens: int, streams: int) -> int:
        async def go() -> int:
            import grpc
            from colloquy.v1 import generation_pb2_grpc

            async with grpc.aio.insecure_channel(self.target) as ch:
                stub = generation_pb2_grpc.GenerationServiceStub(ch)
                runs = await asyncio.gather(*(self._one(stub, prompt, tokens) for _ in range(streams)))
            return sum(sum(r["counts"]) for r in runs)

        return asyncio.run(go())


# -- measuring -------------------------------------------------------------------------------------
def measure_single(run: Callable[[int], dict[str, Any]], prompts: int, repeats: int) -> dict[str, Any]:
    """Batch 1: ``run(prompt_index)`` per prompt per repeat, after one warm-up run."""
    run(0)  # warm-up, excluded
    samples = [run(p) for _ in range(repeats) for p in range(prompts)]
    itl = [x * 1000 for s in samples for x in s["itl_s"]]
    return {"decode_tok_s": summary([s["decode_tok_s"] for s in samples], 1),
            "ttft_ms": summary([s["ttft_s"] * 1000 for s in samples], 1),
            "itl_ms": summary(itl, 2), "tokens": summary([s["tokens"] for s in samples], 0),
            "prompt_tokens": sorted({s["prompt_tokens"] for s in samples})}


def measure_streams(batch: Callable[[int], int], streams: list[int], repeats: int) -> dict[str, Any]:
    """Aggregate tok/s at each stream count, after one warm-up run."""
    out: dict[str, Any] = {}
    batch(streams[0])  # warm-up, excluded (one per contender: the model is warm for every count)
    for n in streams:
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            produced = batch(n)
            rates.append(produced / (time.perf_counter() - start))
        out[str(n)] = summary(rates, 1)
        log(f"  {n} streams: {out[str(n)]['median']} tok/s")
    return out


def measure_interleaved(pairs: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[int], int]]],
                        prompts: int, streams: list[int], repeats: int, srepeats: int) -> dict[str, Any]:
    """measure_single and measure_streams for several contenders, taking turns run by run.

    On a shared machine the load moves within a minute: contenders measured one after the other
    see different machines, contenders taking turns see the same one.
    """
    for single, batch in pairs.values():  # warm-ups, excluded
        single(0)
        batch(streams[0])
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in pairs}
    for _ in range(repeats):
        for p in range(prompts):
            for name, (single, _b) in pairs.items():
                samples[name].append(single(p))
    rates: dict[str, dict[int, list[float]]] = {name: {n: [] for n in streams} for name in pairs}
    for n in streams:
        for _ in range(srepeats):
            for name, (_s, batch) in pairs.items():
                start = time.perf_counter()
                produced = batch(n)
                rates[name][n].append(produced / (time.perf_counter() - start))
        log(f"  {n} streams: " + ", ".join(f"{name} {summary(r[n], 1)['median']} tok/s" for name, r in rates.items()))
    out: dict[str, Any] = {}
    for name in pairs:
        ss = samples[name]
        out[name] = {"single": {"decode_tok_s": summary([s["decode_tok_s"] for s in ss], 1),
                                "ttft_ms": summary([s["ttft_s"] * 1000 for s in ss], 1),
                                "itl_ms": summary([x * 1000 for s in ss for x in s["itl_s"]], 2),
                                "tokens": summary([s["tokens"] for s in ss], 0),
                                "prompt_tokens": sorted({s["prompt_tokens"] for s in ss})},
                     "streams": {str(n): summary(rates[name][n], 1) for n in streams}}
    return out


def _contender(rec: Record, name: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except ModuleNotFoundError as exc:
        rec.skip(name, f"{exc.name} is not installed: the `bench` extra (requirements/bench.lock) provides it; "
                       "llama-cpp-python builds from source there (bench/install.sh), and that build failed or "
                       "was not run")
    except Exception as exc:  # a contender that cannot load is skipped, with the reason
        rec.skip(name, f"{type(exc).__name__}: {exc}")
    return None


def run_inprocess(args: argparse.Namespace) -> Record:
    """The in-process contenders (before any stack starts, so idle services do not compete)."""
    tokens, repeats, srepeats = args.tokens, args.repeats, args.stream_repeats
    streams = [int(s) for s in str(args.streams).split(",") if s]
    model_dir, version = common.served_model()
    rec = Record(NAME, {"model_version": version, "model_dir": str(model_dir), "max_tokens": tokens,
                        "repeats": repeats, "stream_repeats": srepeats, "streams": streams,
                        "prompts": common.QUESTIONS, "method": __doc__.split("\n\n")[2].replace("\n", " ")},
                 settle_s=common.SETTLE_S)
    ort = OrtGenai(str(model_dir))
    ids = [ort.encode(common.chat_prompt(q)) for q in common.QUESTIONS]
    rec.doc["params"]["prompt_tokens"] = [len(i) for i in ids]
    res = rec.results
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    pairs: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[int], int]]] = {
        "ort-genai": (lambda i: ort.single(ids[i], tokens), lambda n: ort.batch(ids[0], tokens, n))}
    ce = None
    if "colloquy-engine" not in args.skip:
        ce = ColloquyEngine(str(model_dir), max(streams))
        pairs["colloquy-engine"] = (lambda i: ce.single(prompts[i], len(ids[i]), tokens),
                                    lambda n: ce.batch(prompts, tokens, n))
    log(f"engine: {' and '.join(pairs)} on {version}, interleaved")
    res.update(measure_interleaved(pairs, len(ids), streams, repeats, srepeats))
    if ce is not None:
        ce.close()
        res["colloquy-engine"]["prefix_cache_ttft"] = measure_cached_ttft(str(model_dir), repeats)
    if "transformers" not in args.skip:
        tf = _contender(rec, "transformers", Transformers)
        if tf is not None:
            log(f"engine: transformers fp32 ({tf.torch.get_num_threads()} torch threads)")
            res["transformers"] = {
                "single": measure_single(lambda i: tf.single(ids[i], tokens), len(ids), repeats),
                "streams": measure_streams(lambda n: tf.batch(ids[0], tokens, n), streams, srepeats)}
            del tf
    if "llama.cpp" not in args.skip:
        import os

        lc = _contender(rec, "llama.cpp", lambda: LlamaCpp(os.cpu_count() or 2))
        if lc is not None:
            log("engine: llama.cpp")
            res["llama.cpp"] = {"single": measure_single(lambda i: lc.single(ids[i], tokens), len(ids), repeats),
                                "streams": {}}
            rec.doc["skipped"]["llama.cpp streams>1"] = (
                "llama-cpp-python's Llama generates one sequence at a time (no batched multi-sequence API)")
            del lc
    return rec


def measure_cached_ttft(model_dir: str, repeats: int) -> dict[str, Any]:
    """TTFT of a new conversation whose hidden instructions are cached, against the cache off.

    The prompt service's current template around each question (system message first, reminder
    appended to the question); the cache-on engine first serves another conversation, so only
    the hidden instructions (not the question) can come from its cache.
    """
    from model.chat_template import render_chatml
    from services.prompt.templates import load_file

    tpl = load_file(common.ROOT / "services" / "prompt" / "templates.yaml").get()

    def prompt(q: str) -> str:
        return render_chatml([{"role": "system", "content": tpl.before},
                              {"role": "user", "content": f"{q}\n\n{tpl.after}"}], add_generation_prompt=True)

    out: dict[str, Any] = {}
    for mode in ("cache_on", "cache_off"):
        ce = ColloquyEngine(model_dir, 1, prefix_cache=mode == "cache_on")
        ce.single(prompt("Say hello."), 0, 2)  # warm-up: another conversation
        out[mode] = summary([ce.single(prompt(q), 0, 2)["ttft_s"] * 1000 for _ in range(max(repeats, 2))
                             for q in common.QUESTIONS], 1)
        ce.close()
    out["ratio"] = _ratio(out["cache_on"]["median"], out["cache_off"]["median"])
    log(f"  TTFT with the hidden instructions cached: {out['cache_on']['median']} ms, cache off "
        f"{out['cache_off']['median']} ms ({out['ratio']}x)")
    return out


def run_deployment(rec: Record, args: argparse.Namespace, stack: Any) -> None:
    """The Colloquy contender on a running stack (its generation service; Kafka is not involved)."""
    from services.common import config
    from services.generation.config import EngineSettings

    if "colloquy" in args.skip:
        return
    settings = config.load(EngineSettings)
    rec.doc["params"]["colloquy_engine"] = {"max_running": settings.max_running, "max_waiting": settings.max_waiting,
                                            "stream_interval_ms": settings.stream_interval_ms}
    p = rec.doc["params"]
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    dep = Deployment(f"127.0.0.1:{stack.ports['generation']}")
    log("engine: colloquy deployment (Ray Serve gRPC)")
    before = common.loadavg()
    try:
        rec.results["colloquy"] = {
            "single": measure_single(lambda i: dep.single(prompts[i], p["prompt_tokens"][i], args.tokens),
                                     len(prompts), args.repeats),
            "streams": measure_streams(lambda n: dep.batch(prompts[0], args.tokens, n), p["streams"],
                                       args.stream_repeats),
            "loadavg": {"before": before, "after": common.loadavg()}}
    except Exception as exc:
        rec.skip("colloquy", f"{type(exc).__name__}: {str(exc)[-600:]}")


def finish(rec: Record) -> dict[str, Any]:
    res, streams = rec.results, rec.doc["params"]["streams"]
    rec.doc["ratios"] = ratios(res)
    if len(streams) > 1:
        series = {name: ([float(n) for n in streams], [r["streams"].get(str(n), {}).get("median") for n in streams])
                  for name, r in res.items() if r.get("streams")}
        rec.doc["plot"] = common.plot(common.RESULTS / "engine.png",
                                      f"Aggregate decode, {rec.doc['params']['model_version']}",
                                      "concurrent streams", "tokens/s (all streams)", series, logx=True)
    doc = rec.finish()
    print(render(doc))
    return doc


def run_deployment_alone(rec: Record, args: argparse.Namespace) -> None:
    """The Colloquy contender on the generation service alone (no Kafka bridge, no other service)."""
    try:
        with common.stack(["generation"], {"generation": {"KAFKA_WORKER": "false"}}) as s:
            run_deployment(rec, args, s)
    except Exception as exc:
        rec.skip("colloquy", f"{type(exc).__name__}: {str(exc)[-600:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Standalone: in-process contenders, then the generation service alone."""
    rec = run_inprocess(args)
    if "colloquy" not in args.skip:
        run_deployment_alone(rec, args)
    return finish(rec)


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """Each contender against ORT GenAI direct (decode at batch 1, aggregate per stream count)."""
    ref = res.get("ort-genai")
    out: dict[str, Any] = {}
    if not ref:
        return out
    for name, r in res.items():
        row = {"decode_batch1": _ratio(r["single"]["decode_tok_s"]["median"],
                                       ref["single"]["decode_tok_s"]["median"])}
        for n, s in r.get("streams", {}).items():
            row[f"aggregate_{n}"] = _ratio(s["median"], ref["streams"].get(n, {}).get("median"))
        out[name] = row
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    streams = [str(n) for n in doc["params"]["streams"]]
    head = ["contender", "decode tok/s b1", "ITL p50/p99 ms", "TTFT ms"] + [f"agg@{n}" for n in streams] + [
        "b1 vs ORT", *(f"@{n} vs ORT" for n in streams if n != "1")]
    out = []
    for name, r in doc["results"].items():
        s = r["single"]
        rat = doc.get("ratios", {}).get(name, {})
        out.append([name, s["decode_tok_s"]["median"], f"{s['itl_ms']['median']}/{s['itl_ms']['p99']}",
                    s["ttft_ms"]["median"], *(r["streams"].get(n, {}).get("median") for n in streams),
                    f"{rat.get('decode_batch1')}x", *(f"{rat.get(f'aggregate_{n}')}x" if rat.get(
                        f"aggregate_{n}") else "-" for n in streams if n != "1")])
    return head, out


def render(doc: dict[str, Any]) -> str:
    head, body = rows(doc)
    text = common.table(body, head)
    for what, why in doc.get("skipped", {}).items():
        text += f"\n(skipped {what}: {why})"
    return text


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=2, help="batch-1 repeats per prompt (after a warm-up)")
    p.add_argument("--stream-repeats", type=int, default=2)
    p.add_argument("--streams", default=",".join(map(str, STREAMS)))
    p.add_argument("--skip", default="", help="comma-separated contenders to leave out")
