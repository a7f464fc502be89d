"""The private library APIs Colloquy uses still exist with the shape it uses (services/common/private_api.py).

These fail loudly on an upgrade that moves one, instead of a service failing at run time (the
poll watchdog silently doing nothing, the sweeper or a Serve deploy crashing).
"""

from __future__ import annotations

import inspect

import kafka
import ray
from kafka import KafkaConsumer

from services.common import private_api

KAFKA = f"kafka-python {kafka.__version__}"
RAY = f"ray {ray.__version__}"


def test_kafka_transaction_types_still_live_where_the_sweeper_imports_them() -> None:
    spec = private_api.AbortTransactionSpec
    assert list(inspect.signature(spec).parameters)[:3] == ["topic_partition", "producer_id", "producer_epoch"], (
        f"{KAFKA}: AbortTransactionSpec{inspect.signature(spec)}")
    states = {s.name for s in private_api.TransactionState}
    assert {"ONGOING", "PREPARE_COMMIT", "PREPARE_ABORT", "PREPARE_EPOCH_FENCE"} <= states, f"{KAFKA}: {states}"


def test_kafka_consumer_still_has_the_waiter_hook_the_poll_watchdog_calls() -> None:
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(3, 0))
    try:
        hook = getattr(getattr(consumer, "_net", None), "_fail_pending_waiters", None)
        assert callable(hook), f"{KAFKA} moved KafkaConsumer._net._fail_pending_waiters"
        assert private_api.fail_pending_waiters(consumer, TimeoutError("test")) is True
    finally:
        consumer.close()


def test_kafka_producer_still_has_the_sender_and_closed_flag_close_now_uses() -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", api_version=(3, 0))
    assert callable(getattr(getattr(producer, "_sender", None), "force_close", None)), (
        f"{KAFKA} moved KafkaProducer._sender.force_close")
    assert producer._closed is False, f"{KAFKA} renamed KafkaProducer._closed"
    private_api.force_close_producer(producer)
    assert producer._closed is True
    producer._sender.join(5)
    assert not producer._sender.is_alive()


def test_kafka_producer_still_keeps_the_tracked_topics_where_gone_topics_reads_them() -> None:
    """A topic tracked without partitions (here: no broker ever answered) is reported; the stage
    loop replaces such a producer (tests/common/test_kafka_loop.py shows the deleted-topic case)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", api_version=(3, 0))
    try:
        assert isinstance(getattr(producer._metadata, "_topics", None), set), (
            f"{KAFKA} moved KafkaProducer._metadata._topics")
        assert private_api.gone_topics(producer) == set()
        producer._metadata.add_topic("t.never.answered")
        assert private_api.gone_topics(producer) == {"t.never.answered"}
    finally:
        private_api.force_close_producer(producer)


def test_the_adapter_reports_a_consumer_without_the_hook() -> None:
    assert private_api.fail_pending_waiters(object(), TimeoutError("test")) is False
    assert private_api.leave_group_on_close(object()) is False


def test_kafka_static_member_still_gates_leave_group_on_is_dynamic_member() -> None:
    """close_leaving_group overrides the gate; tests/common/test_leave_group.py shows the effect."""
    from kafka.coordinator.base import BaseCoordinator

    source = inspect.getsource(BaseCoordinator.maybe_leave_group_async)
    assert "self.is_dynamic_member()" in source, f"{KAFKA}: maybe_leave_group_async no longer asks is_dynamic_member"
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(3, 0), group_id="g",
                             group_instance_id="g-1")
    try:
        assert consumer._coordinator.is_dynamic_member() is False, f"{KAFKA}: a static member counts as dynamic"
        assert private_api.leave_group_on_close(consumer) is True
        assert consumer._coordinator.is_dynamic_member() is True
    finally:
        consumer.close()


def test_ray_serve_private_start_and_client_still_exist_with_the_arguments_used() -> None:
    from ray.serve._private import api as serve_api
    from ray.serve.context import _get_global_client

    params = inspect.signature(serve_api.serve_start).parameters
    assert {"http_options", "grpc_options", "proxy_location"} <= set(params), f"{RAY}: serve_start{params}"
    assert callable(_get_global_client), f"{RAY} moved ray.serve.context._get_global_client"
    from ray.serve._private.client import ServeControllerClient

    assert "_blocking" in inspect.signature(ServeControllerClient.deploy_apps).parameters, (
        f"{RAY}: ServeControllerClient.deploy_apps lost _blocking")


def test_ray_serve_routing_context_still_has_the_backoff_flag_the_affinity_router_sets() -> None:
    import dataclasses
    import types

    from ray.serve._private.request_router.request_router import RequestRouter
    from ray.serve.request_router import PendingRequest

    field = {f.name: f for f in dataclasses.fields(PendingRequest)}.get("routing_context")
    assert field is not None, f"{RAY}: PendingRequest lost routing_context"
    context = field.default_factory()  # type: ignore[misc]
    assert context.should_backoff is False, f"{RAY}: RequestRoutingContext lost should_backoff"
    # The flag still gates the sleep between routing rounds in the base router.
    assert "should_backoff" in inspect.getsource(RequestRouter._choose_replicas_with_backoff), (
        f"{RAY}: RequestRouter no longer reads routing_context.should_backoff")
    request = types.SimpleNamespace(routing_context=context)
    private_api.back_off_between_routing_rounds(request)
    assert context.should_backoff is True


def test_kafka_coordinator_still_keeps_its_member_state_as_strings() -> None:
    """The stall probe (kafka_loop.LagProbe) replaces a consumer that stays out of its group."""
    from kafka.structs import MemberState

    assert {MemberState.UNJOINED, MemberState.REBALANCING, MemberState.STABLE} == \
        {"<unjoined>", "<rebalancing>", "<stable>"}, f"{KAFKA}: MemberState changed"
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(3, 0), group_id="g")
    try:
        assert private_api.group_member_state(consumer) == "unjoined", f"{KAFKA}: no _coordinator.state"
    finally:
        consumer.close()
    assert private_api.group_member_state(object()) is None


def test_kafka_python_checksums_record_batches_with_the_c_crc32c() -> None:
    """kafka-python falls back to a pure-Python CRC-32C (115 us per KB here, against 0.16 us) when
    the optional `crc32c` package is missing, on every batch produced and fetched: the lock
    installs it, and this fails if kafka-python stops picking it up."""
    import crc32c
    from kafka.record import util

    assert util._crc32c is crc32c.crc32c


def test_ray_train_placement_group_cleaner_still_logs_its_warning_where_the_hook_quiets_it() -> None:
    import importlib
    import logging

    from rlhf.job import PG_CLEANER_HOOK

    module = importlib.import_module(private_api.RAY_TRAIN_PG_CLEANER_LOGGER)
    assert module.logger.name == private_api.RAY_TRAIN_PG_CLEANER_LOGGER
    assert "Failed to query Ray Train Controller actor state" in inspect.getsource(module.PlacementGroupCleaner)
    hook_module, _, hook_name = PG_CLEANER_HOOK.rpartition(".")
    hook = getattr(importlib.import_module(hook_module), hook_name)
    level = module.logger.level
    try:
        hook()
        assert not module.logger.isEnabledFor(logging.WARNING) and module.logger.isEnabledFor(logging.ERROR)
    finally:
        module.logger.setLevel(level)
