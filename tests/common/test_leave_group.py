"""A static group member that closes gracefully leaves its group at once (kafka_loop.close_leaving_group).

Real broker, two static members of one group with a 60 s session timeout: after one closes, the
other must own every partition within 20 s, which only a LeaveGroup can bring about (the gone
member's session would still be alive). The control shows kafka-python's own close leaving the
member in the group, which is why the workaround exists and what makes the first test able to fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from services.common import kafka_loop
from services.common.config import KafkaConfig
from tests.common.kafka_util import create

pytestmark = pytest.mark.kafka

PARTITIONS = 4
SESSION_MS = 60_000  # far longer than any wait below: no partition moves by session expiry here
DEADLINE_S = 20.0


class Member(threading.Thread):
    """One static member polling in its own thread (a consumer is not thread-safe); `leave` stops
    it and closes its consumer with `close`, in that thread."""

    def __init__(self, bootstrap: str, group: str, topic: str, instance: str,
                 close: Callable[[KafkaConsumer], None]) -> None:
        super().__init__(name=f"member-{instance}", daemon=True)
        self.consumer = kafka_loop.make_consumer(
            KafkaConfig(bootstrap_servers=bootstrap), group, instance, topic,
            group_instance_id=instance, session_timeout_ms=SESSION_MS, heartbeat_interval_ms=500,
            # A leader that assigned before its metadata held the new topic ("No partition metadata
            # for topic": nothing assigned, seen in CI despite wait_for_topics below) rejoins when a
            # refresh brings the partitions: every 2 s here instead of kafka-python's 5 minutes.
            metadata_max_age_ms=2_000)
        self.instance = instance
        self.close = close
        self.assigned: frozenset[TopicPartition] = frozenset()
        self.error: BaseException | None = None
        self._quit = threading.Event()

    def run(self) -> None:
        try:
            while not self._quit.is_set():
                self.consumer.poll(timeout_ms=100)
                self.assigned = frozenset(self.consumer.assignment())
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc
        finally:
            self.close(self.consumer)

    def leave(self) -> None:
        self._quit.set()
        self.join(30)
        assert not self.is_alive(), f"{self.instance} did not close within 30 s"
        assert self.error is None, self.error


def until(cond: Callable[[], bool], timeout: float) -> bool:
    """Whether `cond` came true within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    assert until(cond, timeout), f"not within {timeout} s: {what}"


def instance_ids(admin: KafkaAdminClient, group: str) -> set[str]:
    members = (admin.describe_groups([group]).get(group) or {}).get("members") or []
    return {m.get("group_instance_id") for m in members}


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    yield client
    client.close()


def join_two(bootstrap: str, unique: str, close_a: Callable[[KafkaConsumer], None]) -> tuple[Member, Member, str]:
    """Members a and b of a fresh group, each owning part of a 4-partition topic."""
    topic = f"t.leave.{unique}"
    create(bootstrap, topic, partitions=PARTITIONS)
    # The group's leader assigns only the partitions its metadata knows: joining before the new
    # topic's metadata reached it gave an empty assignment, redone only at the next metadata
    # refresh (seen in CI: "No partition metadata for topic"; Member refreshes every 2 s).
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.wait_for_topics([topic], timeout_ms=30_000)  # every partition with a leader
    finally:
        admin.close()
    every = {TopicPartition(topic, p) for p in range(PARTITIONS)}

    def split() -> bool:
        return bool(a.assigned) and bool(b.assigned) and a.assigned | b.assigned == every \
            and not a.assigned & b.assigned

    # Still seen under CI load: a leader that assigned nothing and did not rejoin within 60 s even
    # with the 2 s refresh. The join is this test's setup, not what it checks: a fresh group is
    # tried (up to 3), each member closed the way its test closes it.
    for attempt in range(3):
        group = f"g.leave.{unique}.{attempt}"
        a = Member(bootstrap, group, topic, f"a-{unique}-{attempt}", close_a)
        b = Member(bootstrap, group, topic, f"b-{unique}-{attempt}", kafka_loop.close_leaving_group)
        a.start()
        b.start()
        if until(split, 30):
            break
        a.leave()
        b.leave()
    wait_for(split, "both members own part of the topic (3 groups tried)", timeout=0)
    return a, b, group


def test_a_static_member_that_closes_leaves_and_the_other_takes_every_partition(
        kafka_bootstrap: str, unique: str, admin: KafkaAdminClient) -> None:
    a, b, group = join_two(kafka_bootstrap, unique, kafka_loop.close_leaving_group)
    try:
        assert instance_ids(admin, group) >= {a.instance, b.instance}
        a.leave()
        # close() returned after the broker answered the LeaveGroup: a is gone from the group now.
        assert a.instance not in instance_ids(admin, group)
        wait_for(lambda: len(b.assigned) == PARTITIONS,
                 f"b owns all {PARTITIONS} partitions (its session would keep a's for {SESSION_MS / 1000:.0f} s)")
    finally:
        b.leave()


def test_control_kafka_pythons_own_close_keeps_a_static_member_in_the_group(
        kafka_bootstrap: str, unique: str, admin: KafkaAdminClient) -> None:
    """If this fails, kafka-python now leaves on close by itself: private_api.leave_group_on_close
    can go."""
    a, b, group = join_two(kafka_bootstrap, unique, lambda c: c.close(autocommit=False))
    try:
        a.leave()
        assert a.instance in instance_ids(admin, group), "kafka-python's close made a static member leave"
        assert len(b.assigned) < PARTITIONS
    finally:
        b.leave()
