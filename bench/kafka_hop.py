"""One transactional hop in isolation: what Kafka itself costs a stage, and what an at-once output saves.

``python -m bench.kafka_hop``: a plain producer sends a record to a fresh topic, a
``kafka_loop.StageWorker`` (this process, real broker) copies it to a second topic, and a
read_committed consumer waits for the copy; a hop is the time from the send to the copy's arrival.
Variants, interleaved round by round so load drift hits each alike: the copy sent inside the
stage's transaction (the baseline), the copy marked ``at_once`` (sent before the commit), and the
baseline with ``KAFKA_FETCH_MAX_WAIT_MS=10`` instead of 100. Also the stage's own split
(``colloquy_stage_seconds``: arrival, process, send, commit) per variant. No whole stack: it needs
only the broker (and takes no stack lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import uuid
from typing import Any

from bench import common
from bench.common import Record, summary

NAME = "kafka_hop"
VARIANTS = {"transaction": {"at_once": False, "fetch_max_wait_ms": 100},
            "at_once": {"at_once": True, "fetch_max_wait_ms": 100},
            "transaction, fetch wait 10 ms": {"at_once": False, "fetch_max_wait_ms": 10}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from colloquy.v1 import events_pb2
    from kafka.admin import KafkaAdminClient, NewTopic

    from services.common import kafka_loop
    from services.common.config import KafkaConfig

    rec = Record(NAME, {"rounds": args.rounds, "per_round": args.per_round, "gap_ms": args.gap_ms,
                        "variants": VARIANTS, "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    admin = KafkaAdminClient(bootstrap_servers=common.BOOTSTRAP)
    hops: dict[str, list[float]] = {v: [] for v in VARIANTS}
    workers: dict[str, Any] = {}
    made: list[str] = []
    try:
        rigs = {}
        for name, v in VARIANTS.items():
            tag = uuid.uuid4().hex[:8]
            src, dst = f"bench-hop-in-{tag}", f"bench-hop-out-{tag}"
            admin.create_topics([NewTopic(src, 6, 1), NewTopic(dst, 6, 1)])
            made += [src, dst]
            cfg = dataclasses.replace(KafkaConfig(bootstrap_servers=common.BOOTSTRAP),
                                      fetch_max_wait_ms=v["fetch_max_wait_ms"])

            def handle(ev: Any, dst: str = dst, at_once: bool = bool(v["at_once"])) -> Any:
                out = ev.out(dst, ev.message)
                out.at_once = at_once
                yield out

            worker = kafka_loop.StageWorker(f"bench-hop-{tag}", [src], events_pb2.TurnEvent, handle, cfg,
                                            instance_id="0").start()
            workers[name] = worker
            reader = kafka_loop.make_consumer(cfg, None, f"bench-hop-reader-{tag}", dst)
            rigs[name] = (worker, src, reader, kafka_loop.make_producer(cfg, f"bench-hop-{tag}"))
        for worker, _, reader, _ in rigs.values():
            while not worker.is_ready:
                time.sleep(0.05)
            reader.poll(timeout_ms=200)
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (_, src, reader, producer) in rigs.items():
                for _ in range(args.per_round):
                    key = uuid.uuid4().hex
                    start = time.perf_counter()
                    producer.send(src, key=key.encode(), value=events_pb2.TurnEvent(request_id=key).SerializeToString())
                    producer.flush()
                    while not any(m.key == key.encode() for recs in reader.poll(timeout_ms=500).values() for m in recs):
                        pass
                    if r:
                        hops[name].append((time.perf_counter() - start) * 1000)
                    time.sleep(args.gap_ms / 1000)
        stage_of = {name: w.stage for name, w in workers.items()}
        for name in VARIANTS:
            rec.results[name] = {"hop_ms": summary(hops[name], 1), "split_p50_ms": _split(stage_of[name])}
        for _, _, reader, producer in rigs.values():
            reader.close()
            producer.close()
    finally:
        for w in workers.values():
            w.stop()
        admin.delete_topics(made)
        admin.close()
    base = rec.results["transaction"]["hop_ms"]["median"]
    for r in rec.results.values():
        r["vs_transaction"] = round(r["hop_ms"]["median"] / base, 2) if base else None
    doc = rec.finish()
    print(render(doc))
    return doc


def _split(stage: str) -> dict[str, float]:
    """p50 of each part of colloquy_stage_seconds for `stage` in this process (bucket-interpolated)."""
    from prometheus_client import REGISTRY

    from bench.pipeline import SPLIT_PARTS, _bucket_quantile

    out = {}
    for part in SPLIT_PARTS:
        buckets = [(float(s.labels["le"]), s.value) for m in REGISTRY.collect() if m.name == "colloquy_stage_seconds"
                   for s in m.samples if s.name.endswith("_bucket") and s.labels["stage"] == stage
                   and s.labels["part"] == part]
        if buckets and buckets[-1][1]:
            out[part] = round(_bucket_quantile(sorted(buckets), 0.5) * 1000, 2)
    return out


def render(doc: dict[str, Any]) -> str:
    rows = [[name, r["hop_ms"]["median"], r["hop_ms"]["p99"], r["vs_transaction"],
             *[r["split_p50_ms"].get(p) for p in ("arrival", "process", "send", "commit")]]
            for name, r in doc["results"].items()]
    load = f"(load average {doc['machine']['loadavg_before'][0]} -> {doc['machine']['loadavg_after'][0]})"
    return common.table(rows, ["variant", "hop p50 ms", "p99", "p50 vs transaction", "arrival", "process", "send",
                               "commit"]) + "\n" + load


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kafka_hop", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--gap-ms", type=int, default=100, help="pause between records (a lone record each time)")
    run(p.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
