"""Where the CPU goes when the generation deployment streams: CPU seconds per generated token, by process.

On a shared machine tok/s moves with the neighbours' load; the CPU a process spends per token moves
much less. This runs a fixed workload (N concurrent greedy streams of the benchmark's prompts,
`rounds` times) against the generation service started alone (``python -m services.generation``
with ``KAFKA_WORKER=false``, as bench/engine.py's ``colloquy`` contender) and reads psutil's
cpu_times of each process before and after: the replica actor, Serve's gRPC proxy, the Serve
controller, raylet, GCS, the service's driver process, Ray's other processes, and the gRPC client
(this process). The in-process engine (``AsyncEngine`` in this process, no Ray) runs the same
workload first, for the floor. Each ``--variant`` is one stack start with extra ``GENERATION_*``
(or ``RAY_*``: Ray's processes inherit the service's environment) variables, an A/B of settings;
variants run one after another, ``--cycles`` times in turn.
Prints figures (and writes them as JSON with ``--out``); asserts nothing.

    python -m bench.engine_cpu --variant base: --variant paced:GENERATION_STREAM_MESSAGES_PER_S=100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench.common import log, summary

ROLES = (("replica", "ray::ServeReplica"), ("proxy", "ray::ProxyActor"), ("controller", "ray::ServeController"),
         ("raylet", "raylet"), ("gcs", "gcs_server"))


def role_of(cmdline: list[str], is_root: bool) -> str:
    """The role of one process of the service's tree, from its command line."""
    if is_root:
        return "driver"
    text = " ".join(cmdline)
    for role, marker in ROLES:
        if marker in text:
            return role
    return "ray-other"


def cpu_by_role(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each role in the process tree under `root_pid`, and of
    this process (``client``)."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            t = p.cpu_times()
            role = role_of(p.cmdline(), p.pid == root_pid)
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    me = psutil.Process().cpu_times()
    out["client"] = me.user + me.system
    return out


def per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU milliseconds per generated token of each role between two readings, and their total."""
    out = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(1, tokens) for k in after}
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


def measure(batch: Callable[[int], dict[str, Any]], read: Callable[[], dict[str, float]],
            streams: list[int], rounds: int) -> dict[str, Any]:
    """For each stream count: `rounds` runs of `batch(n)`; tok/s, ITL and CPU ms/token per role."""
    batch(streams[-1])  # warm-up, excluded
    out: dict[str, Any] = {}
    for n in streams:
        rates, itl, cpu = [], [], []
        for _ in range(rounds):
            c0, t0 = read(), time.perf_counter()
            made = batch(n)
            wall, c1 = time.perf_counter() - t0, read()
            rates.append(made["tokens"] / wall)
            itl += [x * 1000 for x in made["itl_s"]]
            cpu.append(per_token(c0, c1, made["tokens"]))
        roles = sorted({k for c in cpu for k in c})
        out[str(n)] = {"tok_s": summary(rates, 1), "itl_ms": summary(itl, 1),
                       "cpu_ms_per_token": {r: summary([c.get(r, 0.0) for c in cpu], 3)["median"] for r in roles}}
        log(f"  {n} streams: {out[str(n)]['tok_s']['median']} tok/s, ITL p50/p99 "
            f"{out[str(n)]['itl_ms']['median']}/{out[str(n)]['itl_ms']['p99']} ms, CPU ms/token "
            f"{out[str(n)]['cpu_ms_per_token']}")
    return out


def run_inprocess(prompts: list[str], tokens: int, streams: list[int], rounds: int) -> dict[str, Any]:
    """The engine in this process (no Ray, no gRPC): the floor of CPU per token."""
    import psutil

    from bench.engine import ColloquyEngine

    model_dir, _ = common.served_model()
    ce = ColloquyEngine(str(model_dir), max(streams))

    def read() -> dict[str, float]:
        t = psutil.Process().cpu_times()
        return {"in-process": t.user + t.system}

    try:
        log("engine_cpu: in-process engine")
        return measure(lambda n: ce.batch(prompts, tokens, n), read, streams, rounds)
    finally:
        ce.close()


def run_variant(env: dict[str, str], prompts: list[str], tokens: int, streams: list[int],
                rounds: int) -> dict[str, Any]:
    """The generation service alone with `env` beside the benchmark's settings."""
    from bench.engine import Deployment, deployment_env

    full = {"KAFKA_WORKER": "false", **deployment_env(streams), **env}
    with common.stack(["generation"], {"generation": full}) as s:
        pid = s.procs["generation"].popen.pid
        dep = Deployment(f"127.0.0.1:{s.ports['generation']}")
        return {"env": full, **measure(lambda n: dep.batch(prompts, tokens, n), lambda: cpu_by_role(pid),
                                       streams, rounds)}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:KEY=VALUE,KEY=VALUE`` (``name:`` alone: the defaults)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:[KEY=VALUE,...]")
    env: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.startswith(("GENERATION_", "RAY_")):
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not GENERATION_NAME=VALUE or "
                                             "RAY_NAME=VALUE")
        env[key] = value
    return name, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   help="NAME:[GENERATION_X=V,...]; repeatable (default: one variant with the defaults)")
    p.add_argument("--streams", default="1,16", help="comma-separated stream counts (default 1,16)")
    p.add_argument("--tokens", type=int, default=96, help="max new tokens per stream (default 96)")
    p.add_argument("--rounds", type=int, default=3, help="runs per stream count (default 3)")
    p.add_argument("--cycles", type=int, default=1, help="times the variants run in turn (default 1)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process engine")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = p.parse_args(argv)
    try:
        streams = sorted({int(s) for s in a.streams.split(",") if s.strip()})
    except ValueError:
        p.error(f"--streams {a.streams!r}: expected comma-separated integers")
    if not streams or streams[0] < 1 or a.tokens < 1 or a.rounds < 1 or a.cycles < 1:
        p.error("--streams, --tokens, --rounds and --cycles must be >= 1")
    variants = a.variant or [("default", {})]
    prompts = [common.chat_prompt(q) for q in common.QUESTIONS]
    doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "tokens": a.tokens, "streams": streams,
                           "rounds": a.rounds, "cpus": os.cpu_count(), "loadavg_before": common.loadavg(),
                           "unit": "CPU ms per generated token", "results": {}}
    with common.stack_lock():
        if not a.no_inprocess:
            doc["results"]["in-process"] = run_inprocess(prompts, a.tokens, streams, a.rounds)
        for cycle in range(a.cycles):
            for name, env in variants:
                log(f"engine_cpu: deployment {name} {env} (cycle {cycle + 1})")
                key = name if a.cycles == 1 else f"{name}#{cycle + 1}"
                doc["results"][key] = run_variant(env, prompts, a.tokens, streams, a.rounds)
    doc["loadavg_after"] = common.loadavg()
    print(render(doc))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


def render(doc: dict[str, Any]) -> str:
    roles = ["in-process", "replica", "proxy", "controller", "raylet", "gcs", "driver", "ray-other", "client", "total"]
    head = ["contender", "streams", "tok/s", "ITL p50/p99 ms", *roles]
    body = []
    for name, res in doc["results"].items():
        for n in map(str, doc["streams"]):
            r = res[n]
            cpu = r["cpu_ms_per_token"]
            body.append([name, n, r["tok_s"]["median"], f"{r['itl_ms']['median']}/{r['itl_ms']['p99']}",
                         *(cpu.get(k, "-") for k in roles)])
    return f"{doc['unit']} (load {doc['loadavg_before']} -> {doc.get('loadavg_after')})\n" + common.table(body, head)


if __name__ == "__main__":
    sys.exit(main())
