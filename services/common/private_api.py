"""Every use of a library's private API, behind one adapter each, so an upgrade fails in one place.

kafka-python and Ray Serve offer no public call for the things below that Colloquy needs; the test
``tests/common/test_private_api.py`` checks that each private symbol still exists with the shape
used here, so an upgrade that moves one fails that test loudly instead of a service at run time.

- kafka-python 3.0: the admin client's transaction types live in ``kafka.admin._transactions``
  (the public ``KafkaAdminClient.abort_transaction`` takes an ``AbortTransactionSpec``, which is
  not re-exported), used by the hanging-transaction sweeper (services/common/transactions.py).
- kafka-python 3.0: ``KafkaConsumer._net._fail_pending_waiters`` unblocks a poll stuck on a lost
  wakeup (generation's poll watchdog, services/generation/worker.py).
- kafka-python 3.0: a producer whose sends will never complete cannot be closed publicly
  (``close`` flushes first and raises); ``_sender.force_close()`` and ``_closed`` do what
  ``close`` does next (services/common/kafka_loop.py ``close_now``).
- kafka-python 3.0: ``KafkaConsumer.close()`` sends LeaveGroup only for a dynamic member
  (``BaseCoordinator.maybe_leave_group_async`` is gated on ``is_dynamic_member()``); a static
  member (``group_instance_id``) just goes quiet and keeps its partitions until the session
  timeout. ``_coordinator.is_dynamic_member`` is overridden on the one consumer being closed, so
  close sends LeaveGroup v3+ naming its ``group_instance_id`` (KIP-345)
  (services/common/kafka_loop.py ``close_leaving_group``).
- kafka-python 3.0: whether a consumer is a settled member of its group has no public call;
  ``_coordinator.state`` (a ``kafka.structs.MemberState`` string) says it. The stall probe replaces a consumer that
  stays out of its group (services/common/kafka_loop.py ``LagProbe``).
- kafka-python 3.0: a producer never forgets a topic it has produced to. Once that topic is
  deleted (a gone gateway's reply topic), its metadata refresh runs every retry backoff and the
  sender thread spins on the unknown leader for the producer's whole life (the Java client drops
  a topic idle for ``metadata.max.idle.ms``). Which topics the producer tracks has no public
  call: ``_metadata._topics`` says it (services/common/kafka_loop.py ``tracks_gone_topics``).
- Ray Serve 2.60: deploying a whole config file from Python (what ``serve run config.yaml`` does)
  needs ``ray.serve._private.api.serve_start`` and the global client's ``deploy_apps``
  (services/generation/serving.py).
- Ray Train 2.60: every ``TorchTrainer.fit`` starts a detached ``PlacementGroupCleaner`` that asks
  Ray's state API each second whether the controller is alive; without the dashboard (the RLHF
  job's own local Ray starts none, to leave the cores to training) each ask fails and logs a
  warning, about 1,500 lines in a 25-minute round. Its logger is named after a private module and
  has no public switch; the job's workers set it to ERROR (``quiet_placement_group_cleaner``, a
  ``worker_process_setup_hook``, rlhf/job.py). The cleaner only matters when the controller dies
  and Ray lives on; that local Ray is shut down with the job.
- Ray Serve 2.60: a request router asks Serve to back off between routing rounds (when every
  replica it ranked is full) through ``PendingRequest.routing_context.should_backoff``, whose
  type is not public (services/generation/router.py).
"""

from __future__ import annotations

import logging
from typing import Any

from kafka.admin._transactions import AbortTransactionSpec, TransactionState

__all__ = ["AbortTransactionSpec", "TransactionState", "back_off_between_routing_rounds", "fail_pending_waiters",
           "force_close_producer", "gone_topics", "group_member_state", "leave_group_on_close",
           "quiet_placement_group_cleaner", "serve_client", "serve_start"]

# The logger of Ray Train's PlacementGroupCleaner (a private module's ``__name__``).
RAY_TRAIN_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Ray worker setup hook: only errors from the PlacementGroupCleaner, not its warning each
    second that the state API (the dashboard, not started) does not answer."""
    logging.getLogger(RAY_TRAIN_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def fail_pending_waiters(consumer: Any, exc: BaseException) -> bool:
    """Fail the consumer's pending network waiters with ``exc``; False when this kafka-python
    has no such hook (the caller then waits for the poll's own timeout)."""
    fail = getattr(getattr(consumer, "_net", None), "_fail_pending_waiters", None)
    if fail is None:
        return False
    fail(exc)
    return True


def force_close_producer(producer: Any) -> None:
    """Stop a producer's sender thread without flushing, and mark it closed (or ``__del__``
    tries, and fails, to flush it again)."""
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
    producer._closed = True


def gone_topics(producer: Any) -> set[str]:
    """The topics the producer tracks that the broker's last metadata answer did not have."""
    metadata = producer._metadata
    return {topic for topic in set(metadata._topics) if metadata.partitions_for_topic(topic) is None}


def leave_group_on_close(consumer: Any) -> bool:
    """Make ``consumer.close()`` send LeaveGroup although the consumer is a static member.

    kafka-python then sends it with the member id and ``group_instance_id`` (LeaveGroup v3+, which
    the broker accepts for a static member: KIP-345), so the group rebalances at once instead of
    after the session timeout. Only for a consumer about to be closed: the override stays on it.
    False when this kafka-python has no such gate (close then behaves as the library decides).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if not callable(getattr(coordinator, "is_dynamic_member", None)):
        return False
    coordinator.is_dynamic_member = lambda: True
    return True


def group_member_state(consumer: Any) -> str | None:
    """'stable', 'rebalancing' or 'unjoined' for a consumer in a group; None when this kafka-python
    keeps no such state (the caller then cannot tell, and must not act on it)."""
    state = getattr(getattr(consumer, "_coordinator", None), "state", None)
    return state.strip("<>") if isinstance(state, str) else None


def serve_start(**options: Any) -> Any:
    """Start Serve (controller and proxies with ``options``) and return its client."""
    from ray.serve._private import api as serve_api

    return serve_api.serve_start(**options)


def serve_client() -> Any:
    """The running Serve's client (its ``deploy_apps`` takes a whole config)."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def back_off_between_routing_rounds(pending_request: Any) -> None:
    """Have Serve sleep (exponential backoff) before routing ``pending_request`` again when no
    replica a request router ranked could take it; without it Serve retries at once."""
    pending_request.routing_context.should_backoff = True
