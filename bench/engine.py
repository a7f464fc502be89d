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
- ``llama.cpp-server``: llama.cpp's server (``llama-server -np 16 -c 16384 -t 2``: 16 slots,
  continuous batching) on the GGUF the build came from, over HTTP ``/completion``
  (bench/engine_llamacpp.py; built by bench/build_llama_server.sh): the CPU anchor that batches.

Method: greedy, the same prompts and max_tokens for everyone; the in-process contenders are pinned
to exactly max_tokens (EOS masked; the engine with ``ignore_eos``), the deployment stops at EOS
like in production (its token counts are in the JSON). One warm-up run per contender is dropped
(at batch 1, and before the stream counts). Batch-1 decode tok/s excludes the first token
(prefill); aggregate tok/s is all new tokens over the wall-clock time from the first request to
the last token. ``ort-genai`` and ``colloquy-engine`` take turns run by run (on a shared machine
the load moves within a minute); so does llama.cpp's server (a separate process, idle between its
requests). Inter-token latency at N streams: each stream's gaps between arrivals (coalesced tokens
spread evenly). In-process contenders run before the deployment starts, so Ray's processes do not
compete with them; the deployment is measured in the same script right after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bench import common
from bench.common import Record, fmt, log, summary

NAME = "engine"
STREAMS = (1, 4, 16)
EOS = 2  # <|im_end|> / </s> of SmolLM2
LLAMA = "llama.cpp-server"


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


def produced(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens of concurrent streams and every stream's inter-token gaps (``{"stamps", "counts"}`` each).

    What a batch run returns, so that the aggregate rate and the ITL at N streams come from the
    same runs. ``itl_steady_s``: only the gaps that begin once every stream has its first token,
    to tell the stalls of streams joining (prefills between decode steps) from steady decoding.
    """
    steady_from = max((r["stamps"][0] for r in runs if r["stamps"]), default=0.0)
    itl, steady = [], []
    for r in runs:
        for a, b, n in zip(r["stamps"], r["stamps"][1:], r["counts"][1:], strict=False):
            itl += [(b - a) / n] * n
            if a >= steady_from:
                steady += [(b - a) / n] * n
    return {"tokens": sum(sum(r["counts"]) for r in runs), "itl_s": itl, "itl_steady_s": steady}


def _tokens(out: int | dict[str, Any]) -> int:
    return out if isinstance(out, int) else int(out["tokens"])


def _itl_ms(out: int | dict[str, Any], key: str = "itl_s") -> list[float]:
    """A batch run's gaps in ms (``itl_steady_s``: a static batch's rows start together, all steady)."""
    return [] if isinstance(out, int) else [x * 1000 for x in out.get(key, out["itl_s"])]


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

    def batch(self, ids: list[int], tokens: int, streams: int) -> dict[str, Any]:
        """N rows of one Generator: the tokens generated, and the step times (every row's ITL)."""
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        total = len(ids) + tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=streams)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([ids] * streams, dtype=np.int32))
        stamps: list[float] = []
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return {"tokens": len(stamps) * streams, "itl_s": [b - a for a, b in itertools.pairwise(stamps)]}


class ColloquyEngine:
    """Colloquy's batching engine in this process (AsyncEngine), prefix cache off, EOS ignored."""

    name = "colloquy-engine"

    def __init__(self, model_dir: str, max_running: int, provider: str = "cpu", prefix_cache: bool = False,
                 prefill_chunk: int = 0) -> None:
        """`prefill_chunk` 0: EngineSettings' default (GENERATION_* variables do not reach an engine
        built here: only `config.load` reads them)."""
        from services.generation.config import EngineSettings
        from services.generation.engine import AsyncEngine

        chunk = {"prefill_chunk": prefill_chunk} if prefill_chunk else {}
        self.engine = AsyncEngine(model_dir, "bench", EngineSettings(
            max_running=max_running, max_waiting=1024, provider=provider,
            prefix_cache_conversations=16 if prefix_cache else 0, **chunk))

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

    def batch(self, prompts: list[str], tokens: int, streams: int) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return produced(list(await asyncio.gather(
                *(self._one(prompts[i % len(prompts)], tokens) for i in range(streams)))))

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
            # No repetition penalty, as for the other contenders (unset, the model's manifest sets one).
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens, repetition_penalty=1.0))
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

    def batch(self, prompts: list[str], tokens: int, streams: int) -> dict[str, Any]:
        """N concurrent streams over the prompts in turn, like the in-process engine's."""
        async def go() -> dict[str, Any]:
            import grpc
            from colloquy.v1 import generation_pb2_grpc

            async with grpc.aio.insecure_channel(self.target) as ch:
                stub = generation_pb2_grpc.GenerationServiceStub(ch)
                runs = await asyncio.gather(*(self._one(stub, prompts[i % len(prompts)], tokens)
                                              for i in range(streams)))
            return produced(list(runs))

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


Batch = Callable[[int], "int | dict[str, Any]"]


def measure_streams(batch: Batch, streams: list[int], repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Aggregate tok/s and inter-token latency at each stream count, after one warm-up run."""
    out: dict[str, Any] = {}
    itl: dict[str, Any] = {}
    batch(streams[0])  # warm-up, excluded (one per contender: the model is warm for every count)
    for n in streams:
        rates, gaps, steady = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            made = batch(n)
            rates.append(_tokens(made) / (time.perf_counter() - start))
            gaps += _itl_ms(made)
            steady += _itl_ms(made, "itl_steady_s")
        out[str(n)], itl[str(n)] = summary(rates, 1), summary(gaps, 2)
        itl[f"{n}_steady"] = summary(steady, 2)
        log(f"  {n} streams: {out[str(n)]['median']} tok/s, ITL p50/p99 {itl[str(n)]['median']}/"
            f"{itl[str(n)]['p99']} ms")
    return out, itl


def measure_interleaved(pairs: dict[str, tuple[Callable[[int], dict[str, Any]], Batch]],
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
    gaps: dict[str, dict[int, list[float]]] = {name: {n: [] for n in streams} for name in pairs}
    steady: dict[str, dict[int, list[float]]] = {name: {n: [] for n in streams} for name in pairs}
    for n in streams:
        for _ in range(srepeats):
            for name, (_s, batch) in pairs.items():
                start = time.perf_counter()
                made = batch(n)
                rates[name][n].append(_tokens(made) / (time.perf_counter() - start))
                gaps[name][n] += _itl_ms(made)
                steady[name][n] += _itl_ms(made, "itl_steady_s")
        log(f"  {n} streams: " + ", ".join(f"{name} {summary(r[n], 1)['median']} tok/s" for name, r in rates.items()))
    out: dict[str, Any] = {}
    for name in pairs:
        ss = samples[name]
        out[name] = {"single": {"decode_tok_s": summary([s["decode_tok_s"] for s in ss], 1),
                                "ttft_ms": summary([s["ttft_s"] * 1000 for s in ss], 1),
                                "itl_ms": summary([x * 1000 for s in ss for x in s["itl_s"]], 2),
                                "tokens": summary([s["tokens"] for s in ss], 0),
                                "prompt_tokens": sorted({s["prompt_tokens"] for s in ss})},
                     "streams": {str(n): summary(rates[name][n], 1) for n in streams},
                     "streams_itl_ms": {**{str(n): summary(gaps[name][n], 2) for n in streams},
                                        **{f"{n}_steady": summary(steady[name][n], 2) for n in streams}}}
    return out


def _contender(rec: Record, name: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except ModuleNotFoundError as exc:
        rec.skip(name, f"{exc.name} is not installed: the `bench` extra (requirements/bench.lock, "
                       "bench/install.sh) provides it")
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
    pairs: dict[str, tuple[Callable[[int], dict[str, Any]], Batch]] = {
        "ort-genai": (lambda i: ort.single(ids[i], tokens), lambda n: ort.batch(ids[0], tokens, n))}
    ce = None
    if "colloquy-engine" not in args.skip:
        ce = ColloquyEngine(str(model_dir), max(streams))
        pairs["colloquy-engine"] = (lambda i: ce.single(prompts[i], len(ids[i]), tokens),
                                    lambda n: ce.batch(prompts, tokens, n))
    with contextlib.ExitStack() as servers:
        if LLAMA not in args.skip:
            from bench import engine_llamacpp

            try:
                srv = servers.enter_context(engine_llamacpp.running(threads=2))
                rec.doc["params"]["llama_server_args"] = srv.args[1:]
                pairs[LLAMA] = (lambda i: srv.single(ids[i], tokens), lambda n: srv.batch(ids, tokens, n))
            except Exception as exc:  # not built, or it would not start: said in the JSON and the table
                rec.skip(LLAMA, f"{type(exc).__name__}: {str(exc)[-600:]}")
        log(f"engine: {', '.join(pairs)} on {version}, interleaved")
        res.update(measure_interleaved(pairs, len(ids), streams, repeats, srepeats))
    if ce is not None:
        ce.close()
        res["colloquy-engine"]["prefix_cache_ttft"] = measure_cached_ttft(str(model_dir), repeats)
    if "transformers" not in args.skip:
        tf = _contender(rec, "transformers", Transformers)
        if tf is not None:
            log(f"engine: transformers fp32 ({tf.torch.get_num_threads()} torch threads)")
            agg, _ = measure_streams(lambda n: tf.batch(ids[0], tokens, n), streams, srepeats)
            res["transformers"] = {
                "single": measure_single(lambda i: tf.single(ids[i], tokens), len(ids), repeats), "streams": agg}
            del tf
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
    # The service's settings: its environment is this process's plus what the stack gave it.
    with _environ(stack.extra_env.get("generation", {})):
        settings = config.load(EngineSettings)
    rec.doc["params"]["colloquy_engine"] = {"max_running": settings.max_running, "max_waiting": settings.max_waiting,
                                            "stream_interval_ms": settings.stream_interval_ms,
                                            "stream_messages_per_s": settings.stream_messages_per_s,
                                            "prefix_cache_conversations": settings.prefix_cache_conversations,
                                            "prefill_chunk": settings.prefill_chunk,
                                            "float32_rows": settings.float32_rows}
    p = rec.doc["params"]
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    dep = Deployment(f"127.0.0.1:{stack.ports['generation']}")
    log("engine: colloquy deployment (Ray Serve gRPC)")
    before = common.loadavg()
    try:
        single = measure_single(lambda i: dep.single(prompts[i], p["prompt_tokens"][i], args.tokens),
                                len(prompts), args.repeats)
        agg, itl = measure_streams(lambda n: dep.batch(prompts, args.tokens, n), p["streams"], args.stream_repeats)
        rec.results["colloquy"] = {"single": single, "streams": agg, "streams_itl_ms": itl,
                                   "loadavg": {"before": before, "after": common.loadavg()}}
    except Exception as exc:
        rec.skip("colloquy", f"{type(exc).__name__}: {str(exc)[-600:]}")


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    import os

    old = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def finish(rec: Record) -> dict[str, Any]:
    res, streams = rec.results, rec.doc["params"]["streams"]
    rec.doc["ratios"] = ratios(res)
    if len(streams) > 1:
        series = {name: ([float(n) for n in streams], [r["streams"].get(str(n), {}).get("median") for n in streams])
                  for name, r in res.items() if r.get("streams")}
        rec.doc["plot"] = common.plot(common.RESULTS / "engine.png",
                                      f"Aggregate decode, {rec.doc['params']['model_version']}",
                                      "concurrent streams", "tokens/s (all streams)", series, logx=True)
    rec.doc["goals"] = [dict(zip(GOAL_HEAD, g, strict=True)) for g in goals(rec.doc)]
    doc = rec.finish()
    print(render(doc))
    path = common.RESULTS / "engine.md"
    path.write_text(markdown(doc), encoding="utf-8")
    log(f"engine: wrote {path}")
    return doc


def deployment_env(streams: list[int]) -> dict[str, str]:
    """The generation service's settings for the benchmark, beside its defaults.

    As many running rows as the most streams (the default, 8, would queue half of 16 streams where
    llama.cpp's server runs 16 slots) and the prefix cache off, like every other contender here
    (llama.cpp's ``cache_prompt`` included): the figures compare batching, not prompt reuse, which
    the cached-TTFT goal measures on its own.
    """
    top = str(max(streams))
    return {"GENERATION_MAX_RUNNING": top, "GENERATION_MAX_WAITING": top,
            "GENERATION_PREFIX_CACHE_CONVERSATIONS": "0"}


def run_deployment_alone(rec: Record, args: argparse.Namespace) -> None:
    """The Colloquy contender on the generation service alone (no Kafka bridge, no other service)."""
    env = {"KAFKA_WORKER": "false", **deployment_env(rec.doc["params"]["streams"])}
    rec.doc["params"]["colloquy_env"] = env
    try:
        with common.stack(["generation"], {"generation": env}) as s:
            run_deployment(rec, args, s)
    except Exception as exc:
        rec.skip("colloquy", f"{type(exc).__name__}: {str(exc)[-600:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Standalone: in-process contenders, then the generation service alone, one lock held."""
    with common.stack_lock():
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


GOAL_HEAD = ["subject", "goal (issue 15)", "target", "measured", "status"]
SUBJECTS = {"colloquy": "deployment (Ray Serve gRPC)", "colloquy-engine": "engine in process"}


def goals(doc: dict[str, Any]) -> list[list[Any]]:
    """Issue 15's measured goals, each a ratio of two figures from this one run: met / not met.

    Stated for the deployment; the in-process engine is judged the same way beside it, so that
    what Ray Serve and gRPC cost shows. A figure that was not measured is "unknown", never met.
    """
    res = doc.get("results", {})
    g = lambda *keys: _dig(res, *keys)  # noqa: E731
    out: list[list[Any]] = []
    for subject, label in SUBJECTS.items():
        a1, a16 = g(subject, "streams", "1", "median"), g(subject, "streams", "16", "median")
        lc16, o16 = g(LLAMA, "streams", "16", "median"), g("ort-genai", "streams", "16", "median")
        b1, ob1 = g(subject, "single", "decode_tok_s", "median"), g("ort-genai", "single", "decode_tok_s", "median")
        p50, p99 = g(subject, "streams_itl_ms", "16", "median"), g(subject, "streams_itl_ms", "16", "p99")
        s50, s99 = (g(subject, "streams_itl_ms", "16_steady", "median"),
                    g(subject, "streams_itl_ms", "16_steady", "p99"))
        checks = [
            ("aggregate@16 vs llama.cpp server (16 slots) @16", 1.2, a16, lc16, True),
            ("aggregate@16 vs its own single stream", 3.0, a16, a1, True),
            ("aggregate@16 vs ORT GenAI static batch of 16", 0.9, a16, o16, True),
            ("single-stream decode vs ORT GenAI Generator b1", 0.95, b1, ob1, True),
            ("ITL p99 / p50 @16 streams", 3.0, p99, p50, False),
            ("(diagnostic) the same once all 16 have their first token", 3.0, s99, s50, False),
        ]
        if subject == "colloquy-engine":
            ttft = g(subject, "prefix_cache_ttft")
            checks.append(("TTFT, hidden instructions cached vs cache off", 0.6,
                           _dig(ttft, "cache_on", "median"), _dig(ttft, "cache_off", "median"), False))
        for goal, bound, num, den, at_least in checks:
            r = _ratio(num, den)
            target = f"{'>=' if at_least else '<='} {bound}x"
            measured = f"{fmt(num)} / {fmt(den)} = {r}x" if r is not None else "not measured"
            status = "unknown" if r is None else ("met" if (r >= bound if at_least else r <= bound) else "not met")
            out.append([label, goal, target, measured, status])
    return out


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    streams = [str(n) for n in doc["params"]["streams"]]
    top = streams[-1]
    head = ["contender", "decode tok/s b1", "ITL p50/p99 ms", "TTFT ms"] + [f"agg@{n}" for n in streams] + [
        f"ITL@{top} p50/p99 ms", f"ITL@{top} steady p50/p99", "b1 vs ORT",
        *(f"@{n} vs ORT" for n in streams if n != "1")]
    out = []
    for name, r in doc["results"].items():
        s = r["single"]
        rat = doc.get("ratios", {}).get(name, {})
        itl = r.get("streams_itl_ms", {}).get(top) or {}
        steady = r.get("streams_itl_ms", {}).get(f"{top}_steady") or {}
        out.append([name, s["decode_tok_s"]["median"], f"{s['itl_ms']['median']}/{s['itl_ms']['p99']}",
                    s["ttft_ms"]["median"], *(r["streams"].get(n, {}).get("median") for n in streams),
                    f"{itl['median']}/{itl['p99']}" if itl.get("median") is not None else "-",
                    f"{steady['median']}/{steady['p99']}" if steady.get("median") is not None else "-",
                    f"{rat.get('decode_batch1')}x", *(f"{rat.get(f'aggregate_{n}')}x" if rat.get(
                        f"aggregate_{n}") else "-" for n in streams if n != "1")])
    return head, out


def render(doc: dict[str, Any]) -> str:
    head, body = rows(doc)
    text = common.table(body, head)
    text += "\n\n" + common.table(goals(doc), GOAL_HEAD)
    for what, why in doc.get("skipped", {}).items():
        text += f"\n(skipped {what}: {why})"
    return text


def markdown(doc: dict[str, Any]) -> str:
    """bench/results/engine.md: the figures, issue 15's goals, and how they were taken."""
    head, body = rows(doc)
    p, m = doc["params"], doc["machine"]
    lines = [f"# Engine benchmark ({doc['started']})", "",
             f"Model `{p.get('model_version')}`, greedy, {p.get('max_tokens')} new tokens, prompts of "
             f"{p.get('prompt_tokens')} tokens, streams {p.get('streams')}; {m.get('cpus')} CPUs "
             f"({m.get('processor')}), load {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}"
             f"{' (**noisy**)' if doc.get('noisy') else ''}; {doc.get('seconds')} s. tok/s are medians; "
             "agg@N = all new tokens of N concurrent streams over the wall-clock time.", "",
             common.markdown_table(body, head), "", "## Issue 15's goals (ratios within this run)", "",
             common.markdown_table(goals(doc), GOAL_HEAD), ""]
    if p.get("llama_server_args"):
        lines += [f"llama.cpp server: `llama-server {' '.join(p['llama_server_args'])}`.", ""]
    if p.get("colloquy_engine"):
        lines += [f"Deployment engine settings: {p['colloquy_engine']}.", ""]
    lines += [f"Method: {p.get('method', '')}", ""]
    lines += [f"- skipped {what}: {why}" for what, why in doc.get("skipped", {}).items()]
    return "\n".join(lines).rstrip() + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=2, help="batch-1 repeats per prompt (after a warm-up)")
    p.add_argument("--stream-repeats", type=int, default=2)
    p.add_argument("--streams", default=",".join(map(str, STREAMS)))
    p.add_argument("--skip", default="", help="comma-separated contenders to leave out")
