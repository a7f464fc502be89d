"""Find and abort hanging Kafka transactions, so a stalled pipeline heals itself.

A *hanging transaction* is one a partition still holds open while its transaction coordinator
no longer tracks it: nothing will ever write its commit or abort marker, so the partition's
last stable offset stops there and every `read_committed` consumer behind it (all our stages)
waits forever; a pending offset commit inside it makes the group's offset fetches fail with
`UnstableOffsetCommitError`. KIP-890 ("transactions v2") closes the cause on the broker side
for clients that speak it; kafka-python does not, and we saw one after a broker restart under
load (services/README.md, "Hanging transactions").

The check is the one `kafka-transactions.sh find-hanging` makes (KIP-664), written here
because that tool needs a JVM and an operator at a shell: a partition's open transaction is
hanging when it has seen no write for longer than `older_than_ms` *and* the coordinator does
not list an in-progress transaction of that producer that includes the partition. The age
guard leaves alone a transaction whose markers are being written right now; the coordinator
check leaves alone any live transaction however long it runs (the coordinator times those
out itself). Aborting writes the abort marker the coordinator never wrote.

Every process that runs a stage sweeps every `KAFKA_HANGING_TXN_CHECK_S` (one sweeper per
process; several processes sweeping is harmless, a second abort of the same transaction
finds nothing open). Under Kafka ACLs this needs rights a stage's user lacks (Describe on
every transactional id, ClusterAction), so k8s turns it off in the services and runs
`python -m services.common.transactions` as its own CronJob user instead.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping

from kafka import KafkaAdminClient
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

from services.common.config import KafkaConfig
from services.common.private_api import AbortTransactionSpec, TransactionState
from services.common.topics import ALL as COLLOQUY_TOPICS
from services.common.topics import REPLY_PREFIX

log = logging.getLogger(__name__)

HANGING_FOUND = Gauge(
    "colloquy_kafka_hanging_transactions", "Hanging transactions the last sweep found (before aborting)")
HANGING_ABORTED = Counter(
    "colloquy_kafka_hanging_transactions_aborted_total", "Hanging transactions aborted, by topic", ["topic"])
SWEEPS_FAILED = Counter(
    "colloquy_kafka_hanging_transaction_sweeps_failed_total", "Sweeps that could not complete")

# Coordinator states in which the coordinator will still write this transaction's markers.
IN_PROGRESS = {TransactionState.ONGOING, TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT,
               TransactionState.PREPARE_EPOCH_FENCE}
OFFSETS_TOPIC = "__consumer_offsets"


@dataclasses.dataclass(frozen=True)
class OpenTransaction:
    """A transaction a partition leader reports open (DescribeProducers)."""

    partition: TopicPartition
    producer_id: int
    producer_epoch: int
    start_offset: int
    last_write_ms: int
    # The epoch of the coordinator that wrote this producer's last marker on the partition (-1:
    # none yet). An abort marker must carry at least that epoch or the leader refuses it as
    # fenced: kafka-python's default of -1 aborts only producers that never committed there.
    coordinator_epoch: int = -1


@dataclasses.dataclass(frozen=True)
class CoordinatorView:
    """What the coordinator says of one producer id's current transaction."""

    state: TransactionState
    producer_epoch: int
    partitions: frozenset[TopicPartition]


def find_hanging(open_txns: Iterable[OpenTransaction], coordinator: Mapping[int, CoordinatorView],
                 now_ms: int, older_than_ms: int) -> list[OpenTransaction]:
    """The open transactions nobody will ever finish.

    `coordinator` maps a producer id to the coordinator's view of it; a producer id missing
    from it is one no coordinator lists.
    """
    hanging = []
    for txn in open_txns:
        if now_ms - txn.last_write_ms < older_than_ms:
            continue
        view = coordinator.get(txn.producer_id)
        if (view is not None and view.state in IN_PROGRESS and txn.partition in view.partitions
                and view.producer_epoch >= txn.producer_epoch):
            continue  # the coordinator still owns it and will commit, abort or time it out
        hanging.append(txn)
    return hanging


def watched_topics(names: Iterable[str]) -> list[str]:
    """Colloquy's topics, the per-gateway reply topics and the offsets topic (where a pending
    offset commit inside a hanging transaction blocks a whole consumer group)."""
    ours = {t.name for t in COLLOQUY_TOPICS}
    return sorted(n for n in names if n in ours or n.startswith(REPLY_PREFIX) or n == OFFSETS_TOPIC)


class Janitor:
    """Sweeps for hanging transactions over one admin client and aborts them."""

    def __init__(self, kafka: KafkaConfig, older_than_ms: int, *, dry_run: bool = False,
                 topics: Iterable[str] | None = None) -> None:
        self.kafka = kafka
        self.topics = None if topics is None else sorted(topics)  # None: `watched_topics` of the cluster
        self.older_than_ms = older_than_ms
        self.dry_run = dry_run
        self._admin: KafkaAdminClient | None = None
        for name in [*(t.name for t in COLLOQUY_TOPICS), OFFSETS_TOPIC]:
            HANGING_ABORTED.labels(name)  # zero from the start: alerts and dashboards see 0, not "no data"

    def _client(self) -> KafkaAdminClient:
        if self._admin is None:
            self._admin = KafkaAdminClient(**self.kafka.client_kwargs(), client_id="colloquy-txn-janitor")
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def open_transactions(self) -> list[OpenTransaction]:
        admin = self._client()
        names = self.topics if self.topics is not None else watched_topics(admin.list_topics())
        partitions = [TopicPartition(t["name"], p["partition_index"])
                      for t in (admin.describe_topics(names) if names else []) for p in t["partitions"]]
        found = []
        for tp, state in admin.describe_producers(partitions).items():
            for p in state.active_producers:
                if p.current_transaction_start_offset >= 0:
                    found.append(OpenTransaction(tp, p.producer_id, p.producer_epoch,
                                                 p.current_transaction_start_offset, p.last_timestamp,
                                                 p.coordinator_epoch))
        return found

    def coordinator_views(self, producer_ids: set[int]) -> dict[int, CoordinatorView]:
        if not producer_ids:
            return {}
        admin = self._client()
        listed = [t for txns in admin.list_transactions(producer_id_filters=sorted(producer_ids)).values()
                  for t in txns]
        described = admin.describe_transactions([t.transactional_id for t in listed]) if listed else {}
        return {d.producer_id: CoordinatorView(d.state, d.producer_epoch, frozenset(d.topic_partitions))
                for d in described.values()}

    def sweep(self) -> list[OpenTransaction]:
        """One pass: find, then abort (unless a dry run). Returns what was found hanging."""
        now_ms = int(time.time() * 1000)
        # Only idle ones need the coordinators' word (find_hanging applies the same age rule).
        idle = [t for t in self.open_transactions() if now_ms - t.last_write_ms >= self.older_than_ms]
        hanging = find_hanging(idle, self.coordinator_views({t.producer_id for t in idle}), now_ms,
                               self.older_than_ms)
        HANGING_FOUND.set(len(hanging))
        for txn in hanging:
            log.warning("hanging transaction%s", " (dry run: left open)" if self.dry_run else "; aborting it", extra={
                "topic": txn.partition.topic, "partition": txn.partition.partition,
                "producer_id": txn.producer_id, "producer_epoch": txn.producer_epoch,
                "start_offset": txn.start_offset, "idle_s": round((now_ms - txn.last_write_ms) / 1000)})
            if not self.dry_run:
                # As Kafka's own tool does (TransactionsCommand: the producer state's epoch, else 0).
                self._client().abort_transaction(AbortTransactionSpec(
                    txn.partition, txn.producer_id, txn.producer_epoch, max(txn.coordinator_epoch, 0)))
                HANGING_ABORTED.labels(txn.partition.topic).inc()
        return hanging


_started: threading.Thread | None = None
_lock = threading.Lock()
_stop = threading.Event()


def start_sweeper(kafka: KafkaConfig) -> None:
    """Sweep in a daemon thread, once per process, if `KAFKA_HANGING_TXN_CHECK_S` > 0."""
    global _started
    if kafka.hanging_txn_check_s <= 0:
        return
    with _lock:
        if _started is not None:
            return
        janitor = Janitor(kafka, int(kafka.hanging_txn_age_s * 1000))
        _started = threading.Thread(target=_sweep_forever, args=(janitor, kafka.hanging_txn_check_s),
                                    name="txn-janitor", daemon=True)
        _started.start()
        # Stop between sweeps at exit and close the admin client (its I/O thread), rather than
        # leave a daemon thread in the middle of a request while the interpreter is torn down.
        atexit.register(_stop_sweeper)


def _stop_sweeper(timeout_s: float = 5.0) -> None:
    _stop.set()
    if _started is not None:
        _started.join(timeout_s)


def _sweep_forever(janitor: Janitor, interval_s: float) -> None:
    try:
        while not _stop.wait(interval_s):
            try:
                janitor.sweep()
            except Exception:  # a broker restart or a missing right must not kill the process
                SWEEPS_FAILED.inc()
                log.warning("hanging-transaction sweep failed", exc_info=True)
                janitor.close()
    finally:
        janitor.close()


def push_metrics(url: str) -> None:
    """This process's sweep metrics to a Pushgateway, as job `kafka-txn-janitor`. Each run pushes
    counters that start at 0, which `increase()` reads as resets: the sum still counts aborts."""
    registry = CollectorRegistry()
    for metric in (HANGING_FOUND, HANGING_ABORTED, SWEEPS_FAILED):
        registry.register(metric)
    try:
        push_to_gateway(url, job="kafka-txn-janitor", registry=registry, timeout=5)
    except Exception as exc:  # an unreachable gateway must not hide the sweep's own result
        log.warning("pushgateway %s: %s", url, exc)


def main(argv: list[str] | None = None) -> int:
    from services.common import config
    from services.common import log as logs

    parser = argparse.ArgumentParser(prog="python -m services.common.transactions", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="report hanging transactions, abort none")
    parser.add_argument("--pushgateway", default=os.environ.get("PUSHGATEWAY_URL", ""),
                        help="push this run's metrics there (a one-shot run has no scrape endpoint;"
                             " default: PUSHGATEWAY_URL)")
    parser.add_argument("--older-than", type=float, default=None,
                        help="seconds without a write before an open transaction counts"
                             " (default: KAFKA_HANGING_TXN_AGE_S)")
    args = parser.parse_args(argv)
    logs.setup("txn-janitor")
    kafka = config.load_or_exit(KafkaConfig)
    age = kafka.hanging_txn_age_s if args.older_than is None else args.older_than
    janitor = Janitor(kafka, int(age * 1000), dry_run=args.dry_run)
    try:
        hanging = janitor.sweep()
    except Exception:
        SWEEPS_FAILED.inc()
        raise
    finally:
        janitor.close()
        if args.pushgateway:
            push_metrics(args.pushgateway)
    for txn in hanging:
        print(f"{txn.partition.topic}\t{txn.partition.partition}\tproducer {txn.producer_id}/{txn.producer_epoch}"
              f"\tstart offset {txn.start_offset}\t{'found' if args.dry_run else 'aborted'}")
    print(f"{len(hanging)} hanging transaction(s){' found' if args.dry_run else ' aborted'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
