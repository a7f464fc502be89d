"""Chat slots: the replica-wide cap and the per-user cap (pure counting, no I/O)."""

from __future__ import annotations

from services.gateway.admission import Admission


def test_one_user_cannot_take_every_slot_and_another_user_is_still_admitted() -> None:
    slots = Admission(max_total=10, max_per_user=2)
    assert [slots.acquire("ann") for _ in range(3)] == [None, None, "user_concurrency"]
    assert slots.acquire("bob") is None
    slots.release("ann")
    assert slots.acquire("ann") is None  # a finished chat frees the user's slot


def test_replica_capacity_is_checked_first_and_released_slots_are_reused() -> None:
    slots = Admission(max_total=2, max_per_user=0)  # 0: no per-user cap
    assert [slots.acquire("ann") for _ in range(3)] == [None, None, "capacity"]
    slots.release("ann")
    slots.release("ann")
    slots.release("ann")  # an extra release never goes below zero
    assert (slots.total, slots.held("ann")) == (0, 0)
    assert slots.acquire("bob") is None
