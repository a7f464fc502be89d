"""One transactional hop in isolation: what Kafka itself costs a stage, and what an at-once output saves.

``python -m bench.kafka_hop``: a plain producer sends a record to a fresh topic, a stage (this
process, real broker) copies it to a second topic, and a read_committed consumer waits for the
copy; a hop is the time from the send to the copy's arrival. Variants, interleaved round by round
so load drift hits each alike: a ``kafka_loop.StageWorker`` sending the copy inside its
transaction (the baseline), the copy marked ``at_once`` (sent before the commit), the baseline
with ``KAFKA_FETCH_MAX_WAIT_MS=10`` instead of 100, the baseline asking the broker about its output
topic inside every transaction (``KAFKA_OUTPUT_CHECK_TTL_MS=0``: what every transaction of a stage
whose records come more than the TTL apart did before the refresh-ahead of ``kafka_loop.OutputTopics``;
run it with ``--gap-ms`` above 1000 to compare), the baseline with the interpreter's switch
interval at 0.5 ms instead of 5 ms (set only while that variant's records run), and a probe of
the same transactional hop with confluent-kafka (librdkafka), not the product's client: its stage
alone between kafka-python ends, and the whole hop (ends and stage) in confluent-kafka. Also each
stage's own split (``colloquy_stage_seconds``: arrival, process, send, commit) per variant. No
whole stack: it needs only the broker (and takes no stack lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Record, summary

NAME = "kafka_hop"
PROBE = "confluent-kafka transaction (probe, not the product's client)"
VARIANTS: dict[str, dict[str, Any]] = {
    "transaction": {"stage": "kafka-python", "ends": "kafka-python", "at_once": False, "fetch_max_wait_ms": 100},
    "at_once": {"stage": "kafka-python", "ends": "kafka-python", "at_once": True, "fetch_max_wait_ms": 100},
    "transaction, fetch wait 10 ms": {"stage": "kafka-python", "ends": "kafka-python", "at_once": False,
                                      "fetch_max_wait_ms": 10},
    "transaction, output topics asked every time": {"stage": "kafka-python", "ends": "kafka-python",
                                                     "at_once": False, "fetch_max_wait_ms": 100,
                                                     "output_check_ttl_ms": 0},
    "transaction, switch interval 0.5 ms": {"stage": "kafka-python", "ends": "kafka-python", "at_once": False,
                                            "fetch_max_wait_ms": 100, "switch_interval_s": 0.0005},
    f"{PROBE}: stage only": {"stage": "confluent-kafka", "ends": "kafka-python", "at_once": False,
                             "fetch_max_wait_ms": 100},
    f"{PROBE}: whole hop": {"stage": "confluent-kafka", "ends": "confluent-kafka", "at_once": False,
                            "fetch_max_wait_ms": 100},
}


def _ck_common(fetch_max_wait_ms: int) -> dict[str, Any]:
    """librdkafka settings matched to kafka_loop's kafka-python ones, tuned for latency alike:
    no linger (librdkafka's default is 5 ms), Nagle off, the same fetch wait, min bytes 1."""
    return {"bootstrap.servers": common.BOOTSTRAP, "socket.nagle.disable": True, "linger.ms": 0,
            "fetch.wait.max.ms": fetch_max_wait_ms, "fetch.min.bytes": 1}


def _ck_producer(fetch_max_wait_ms: int, transactional_id: str | None = None) -> Any:
    from confluent_kafka import Producer

    conf = {k: v for k, v in _ck_common(fetch_max_wait_ms).items() if not k.startswith("fetch.")}
    conf.update({"acks": "all", "enable.idempotence": True})
    if transactional_id:
        conf.update({"transactional.id": transactional_id, "transaction.timeout.ms": 20_000})
    return Producer(conf)


def _ck_consumer(fetch_max_wait_ms: int, group_id: str, **extra: Any) -> Any:
    from confluent_kafka import Consumer

    conf = {k: v for k, v in _ck_common(fetch_max_wait_ms).items() if k != "linger.ms"}
    conf.update({"group.id": group_id, "isolation.level": "read_committed", "enable.auto.commit": False,
                 "auto.offset.reset": "earliest", "session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000,
                 **extra})
    return Consumer(conf)


class ConfluentStage(threading.Thread):
    """StageWorker's transactional loop with confluent-kafka, for the probe only: consume a batch
    (read_committed, static member), copy each record, send the copies and the consumed offsets in
    one transaction. No retries, dead letters or output checks: just the Kafka calls, timed into
    the same ``colloquy_stage_seconds`` parts as StageWorker."""

    def __init__(self, stage: str, src: str, dst: str, fetch_max_wait_ms: int, max_records: int) -> None:
        super().__init__(name=f"{stage}-worker", daemon=True)
        self.stage, self.src, self.dst, self.max_records = stage, src, dst, max_records
        self.ready, self.stopping, self.error = threading.Event(), threading.Event(), None
        self._fetch_max_wait_ms = fetch_max_wait_ms

    def run(self) -> None:
        from confluent_kafka import TopicPartition

        from services.common import metrics

        part = {p: metrics.STAGE_SECONDS.labels(self.stage, p) for p in ("arrival", "process", "send", "commit")}
        consumer = _ck_consumer(self._fetch_max_wait_ms, f"colloquy-{self.stage}",
                                **{"group.instance.id": f"{self.stage}-0"})
        producer = _ck_producer(self._fetch_max_wait_ms, f"colloquy-{self.stage}-0")
        try:
            producer.init_transactions(30)
            consumer.subscribe([self.src], on_assign=lambda _c, parts: parts and self.ready.set())
            while not self.stopping.is_set():
                # poll for the first record, then take what else is already there: consume() with
                # a timeout waits the whole timeout for a full batch.
                first = consumer.poll(0.2)
                if first is None:
                    continue
                msgs = [m for m in [first, *consumer.consume(self.max_records - 1, 0)] if m.error() is None]
                if not msgs:
                    continue
                now_ms = time.time() * 1000
                for m in msgs:
                    part["arrival"].observe(max(0.0, now_ms - m.timestamp()[1]) / 1000)
                started = time.perf_counter()
                outs = [(m.key(), m.value(), m.headers()) for m in msgs]
                offsets = {(m.topic(), m.partition()): m.offset() + 1 for m in msgs}
                processed = time.perf_counter()
                producer.begin_transaction()
                for key, value, headers in outs:
                    producer.produce(self.dst, value=value, key=key, headers=headers)
                producer.flush(5)
                flushed = time.perf_counter()
                producer.send_offsets_to_transaction([TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                                     consumer.consumer_group_metadata(), 10)
                producer.commit_transaction(10)
                part["process"].observe(processed - started)
                part["send"].observe(flushed - processed)
                part["commit"].observe(time.perf_counter() - flushed)
        except BaseException as exc:  # kept for the bench to report; the probe does not recover
            self.error = exc
            raise
        finally:
            consumer.close()

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set()

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


def _kafka_python_ends(cfg: Any, src: str, dst: str, tag: str) -> tuple[Callable[[str], None],
                                                                      Callable[[str], None], Callable[[], None]]:
    """(send a record keyed `key`, wait for its copy, close) with kafka-python clients."""
    from colloquy.v1 import events_pb2

    from services.common import kafka_loop

    reader = kafka_loop.make_consumer(cfg, None, f"bench-hop-reader-{tag}", dst)
    producer = kafka_loop.make_producer(cfg, f"bench-hop-{tag}")
    reader.poll(timeout_ms=200)

    def send(key: str) -> None:
        producer.send(src, key=key.encode(), value=events_pb2.TurnEvent(request_id=key).SerializeToString())
        producer.flush()

    def wait(key: str) -> None:
        while not any(m.key == key.encode() for recs in reader.poll(timeout_ms=500).values() for m in recs):
            pass

    def close() -> None:
        reader.close()
        producer.close()

    return send, wait, close


def _confluent_ends(fetch_max_wait_ms: int, src: str, dst: str, tag: str) -> tuple[
        Callable[[str], None], Callable[[str], None], Callable[[], None]]:
    """(send, wait, close) with confluent-kafka clients: the probe's whole hop in librdkafka."""
    from colloquy.v1 import events_pb2

    producer = _ck_producer(fetch_max_wait_ms)
    reader = _ck_consumer(fetch_max_wait_ms, f"bench-hop-reader-{tag}")
    assigned = threading.Event()
    reader.subscribe([dst], on_assign=lambda _c, parts: parts and assigned.set())
    deadline = time.monotonic() + 30
    while not assigned.is_set() and time.monotonic() < deadline:
        reader.poll(0.1)
    if not assigned.is_set():
        raise RuntimeError(f"the confluent-kafka reader of {dst} got no partitions in 30 s")

    def send(key: str) -> None:
        producer.produce(src, key=key.encode(), value=events_pb2.TurnEvent(request_id=key).SerializeToString())
        producer.flush(5)

    def wait(key: str) -> None:
        while True:
            m = reader.poll(0.5)
            if m is not None and m.error() is None and m.key() == key.encode():
                return

    def close() -> None:
        reader.close()
        producer.flush(5)

    return send, wait, close


def run(args: argparse.Namespace) -> dict[str, Any]:
    from colloquy.v1 import events_pb2
    from kafka.admin import KafkaAdminClient, NewTopic

    from services.common import kafka_loop
    from services.common.config import KafkaConfig

    rec = Record(NAME, {"rounds": args.rounds, "per_round": args.per_round, "gap_ms": args.gap_ms,
                        "variants": VARIANTS, "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    variants = {n: v for n, v in VARIANTS.items() if not args.only or n in args.only.split("|")}
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:  # a bench extra: without it the probe is skipped, not failed
        for name in [n for n, v in variants.items() if "confluent-kafka" in (v["stage"], v["ends"])]:
            rec.skip(name, "confluent-kafka is not installed (bench/install.sh installs requirements/bench.lock)")
            del variants[name]
    admin = KafkaAdminClient(bootstrap_servers=common.BOOTSTRAP)
    hops: dict[str, list[float]] = {v: [] for v in variants}
    workers: dict[str, Any] = {}
    made: list[str] = []
    ends: dict[str, tuple[Callable[[str], None], Callable[[str], None], Callable[[], None]]] = {}
    default_switch = sys.getswitchinterval()
    try:
        for name, v in variants.items():
            tag = uuid.uuid4().hex[:8]
            src, dst = f"bench-hop-in-{tag}", f"bench-hop-out-{tag}"
            admin.create_topics([NewTopic(src, 6, 1), NewTopic(dst, 6, 1)])
            made += [src, dst]
            cfg = KafkaConfig(bootstrap_servers=common.BOOTSTRAP)
            cfg = dataclasses.replace(cfg, fetch_max_wait_ms=v["fetch_max_wait_ms"],
                                      output_check_ttl_ms=v.get("output_check_ttl_ms", cfg.output_check_ttl_ms))
            if v["stage"] == "confluent-kafka":
                worker: Any = ConfluentStage(f"bench-hop-{tag}", src, dst, v["fetch_max_wait_ms"],
                                             cfg.max_poll_records)
                worker.start()
            else:
                def handle(ev: Any, dst: str = dst, at_once: bool = bool(v["at_once"])) -> Any:
                    out = ev.out(dst, ev.message)
                    out.at_once = at_once
                    yield out

                worker = kafka_loop.StageWorker(f"bench-hop-{tag}", [src], events_pb2.TurnEvent, handle, cfg,
                                                instance_id="0").start()
            workers[name] = worker
            ends[name] = (_confluent_ends(v["fetch_max_wait_ms"], src, dst, tag) if v["ends"] == "confluent-kafka"
                          else _kafka_python_ends(cfg, src, dst, tag))
        for name, worker in workers.items():
            deadline = time.monotonic() + 60
            while not worker.is_ready:
                if worker.error is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"variant {name!r}: its stage never got partitions ({worker.error!r})")
                time.sleep(0.05)
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (send, wait, _) in ends.items():
                sys.setswitchinterval(VARIANTS[name].get("switch_interval_s", default_switch))
                try:
                    for _ in range(args.per_round):
                        key = uuid.uuid4().hex
                        start = time.perf_counter()
                        send(key)
                        wait(key)
                        if r:
                            hops[name].append((time.perf_counter() - start) * 1000)
                        time.sleep(args.gap_ms / 1000)
                finally:
                    sys.setswitchinterval(default_switch)
        for name, worker in workers.items():
            rec.results[name] = {"hop_ms": summary(hops[name], 1), "split_p50_ms": _split(worker.stage)}
        for _, _, close in ends.values():
            close()
    finally:
        for w in workers.values():
            w.stop()
        admin.delete_topics(made)
        admin.close()
    base = rec.results["transaction"]["hop_ms"]["median"]
    for r in rec.results.values():
        r["vs_transaction"] = round(r["hop_ms"]["median"] / base, 2) if base else None
    doc = rec.finish()
    text = render(doc)
    print(text)
    (common.RESULTS / f"{NAME}.md").write_text(markdown(doc, text), encoding="utf-8")
    return doc


def markdown(doc: dict[str, Any], table: str) -> str:
    """The table as bench/results/kafka_hop.md, with the load the run saw (a shared machine's
    figures are only comparable within the run: read the ratios)."""
    m = doc["machine"]
    return (f"# kafka_hop ({doc['started']})\n\n`python -m bench.kafka_hop --rounds {doc['params']['rounds']} "
            f"--per-round {doc['params']['per_round']}`; split columns are the stage's p50 ms per part.\n"
            f"Machine: {m['cpus']} CPUs, load average {m['loadavg_before'][0]} at the start"
            f"{' (shared with other jobs: noisy, compare ratios within this run only)' if doc.get('noisy') else ''}."
            f"\n\n```\n{table}\n```\n" + "".join(f"\nSkipped {k}: {v}\n" for k, v in doc.get("skipped", {}).items()))


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
    p.add_argument("--only", default="", help="variant names separated by | (default: all)")
    with common.broker():
        run(p.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
