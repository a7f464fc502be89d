"""``python -m bench [engine pipeline conversation stages report ...]``: the benchmark suite.

No names runs them all, then writes ``bench/results/REPORT.md``. Order: the in-process parts
first (engine contenders, stage throughput, ORT GenAI KV reuse), then one whole stack shared by
the pipeline and long-conversation benchmarks, so idle services never compete with in-process
measurements and Ray starts as few times as possible. ``make bench BENCH=engine`` runs one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from bench import (
    affinity,
    canary,
    common,
    conversation,
    engine,
    history_store,
    model_quality,
    pipeline,
    rebalance,
    report,
    scale,
    stages,
    web,
)

ALL = ("engine", "stages", "pipeline", "conversation")
# Run only when named: the quality gate of every build (minutes per build); the HTTP front's overhead;
# the conversation store loaded with a million turns (about 10 minutes); stage throughput at 1 and
# 2 replicas with the rebalance stall (a few minutes); stage replicas added and removed under chat load
# (a whole stack, about 8 minutes); prefix-cache hits with the affinity router vs Serve's default at
# 2 generation replicas, and failover (its own Ray, a few minutes).
# canary: one automatic canary promoted and one rolled back on a whole stack with Prometheus (about
# 4 minutes).
EXTRA = ("model", "web", "history_store", "scale", "rebalance", "affinity", "canary")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*",
                   help=f"benchmarks to run: {', '.join((*ALL, *EXTRA))}, report (default: {', '.join(ALL)}, report)")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens for every contender")
    p.add_argument("--resume", action="store_true",
                   help="keep the in-process parts of engine.json/conversation.json and run only the stack parts")
    for mod in (engine, pipeline, conversation, stages, model_quality, web, history_store, scale, rebalance,
                affinity, canary):
        mod.add_args(p.add_argument_group(mod.NAME))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.skip = {s.strip() for s in str(args.skip).split(",") if s.strip()}
    names = [n for part in args.names for n in part.replace(",", " ").split()] or [*ALL, "report"]
    unknown = [n for n in names if n not in (*ALL, *EXTRA, "report")]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join((*ALL, *EXTRA, 'report'))}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The whole run holds the machine (the cores are shared): in-process figures and the stack's
    # come from one quiet stretch, and no other heavy run starts between them.
    heavy = [n for n in names if n != "report"]  # the report only reads the results
    # One broker for the whole run (the stages and Kafka-hop benchmarks need one, the stacks reuse
    # it), stopped at the end if the run started it.
    with common.stack_lock() if heavy else contextlib.nullcontext(), \
            common.broker() if heavy else contextlib.nullcontext():
        return _run(args, names)


def _run(args: argparse.Namespace, names: list[str]) -> int:
    started = time.perf_counter()
    if "model" in names:
        model_quality.run(args)
    eng = None
    if "engine" in names:
        eng = common.Record.resume(engine.NAME) if args.resume else None
        if eng is None or "ort-genai" not in eng.results:
            eng = engine.run_inprocess(args)
        else:
            common.log("engine: resuming bench/results/engine.json (in-process contenders kept)")
            eng.unskip("colloquy")
    if "stages" in names:
        stages.run(args)
    if "scale" in names:
        scale.run(args)
    if "history_store" in names:
        history_store.run(args)
    if "rebalance" in names:
        rebalance.run(args)  # its own stack: replicas come and go in it
    if "affinity" in names:
        affinity.run(args)  # its own Ray: two generation replicas, one router after the other
    if "canary" in names:
        canary.run(args)  # its own stack: a registry of its own, Prometheus, two canaries
    conv = None
    if "conversation" in names:
        conv = common.Record.resume(conversation.NAME) if args.resume else None
        if conv is None or "kv_reuse" not in conv.results:
            conv = conversation.start(args)
            conversation.run_kv(conv, args)
        else:
            common.log("conversation: resuming bench/results/conversation.json (KV-reuse part kept)")
            conv.unskip("gateway")
    need_gateway_conv = conv is not None and args.conversations > 0
    if (eng is not None and "colloquy" not in args.skip and "pipeline" not in names and "web" not in names
            and not need_gateway_conv):
        engine.run_deployment_alone(eng, args)  # only the generation service: no whole stack needed
    elif ("pipeline" in names or "web" in names or need_gateway_conv
          or (eng is not None and "colloquy" not in args.skip)):
        try:
            with common.stack() as s:  # one stack (one Ray start, one lock) for every stack benchmark
                if eng is not None:
                    engine.run_deployment(eng, args, s)
                if "pipeline" in names:
                    pipeline.run(args, s)
                if "web" in names:
                    web.run(args, s)
                if need_gateway_conv:
                    conversation.run_gateway(conv, args, s)
        except Exception as exc:  # the stack did not come up (or died): the report says so
            if eng is not None and "colloquy" not in eng.results:
                eng.skip("colloquy", f"{type(exc).__name__}: {str(exc)[-600:]}")
            if conv is not None:
                conv.skip("gateway", f"{type(exc).__name__}: {str(exc)[-600:]}")
            if "pipeline" in names and not pipeline.DONE:
                failed = common.Record(pipeline.NAME, {})
                failed.skip("pipeline", f"{type(exc).__name__}: {str(exc)[-600:]}")
                failed.finish()
            common.log(f"stack benchmarks failed: {exc}")
    if eng is not None:
        engine.finish(eng)
    if conv is not None:
        conversation.finish(conv)
    if "report" in names:
        path = report.write()
        print(f"\nreport: {path.relative_to(common.ROOT)}")
    common.log(f"suite done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
