"""The per-user token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from services.common import retry_hint
from services.gateway.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_sustained_rate() -> None:
    clock = Clock()
    rl = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [rl.take("u") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert rl.take("u") == pytest.approx(0.5)  # empty: one token every 0.5 s
    clock.t += 0.5
    assert rl.take("u") == 0.0
    assert rl.take("v") == 0.0  # another user has a bucket of their own
    clock.t += 60  # idle: refills to the burst, not beyond
    assert [rl.take("u") for _ in range(4)][-1] > 0


def test_memory_is_bounded_by_forgetting_idle_users() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_keys=10, clock=Clock())
    for i in range(1000):
        rl.take(f"user-{i}")
    assert len(rl._buckets) == 10


def test_retry_hint_is_whole_seconds_and_never_zero() -> None:
    assert retry_hint.seconds(0.01) == 1 and retry_hint.seconds(1.2) == 2
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
