"""Chat slots of one gateway replica: a replica-wide cap and a per-user cap (no I/O).

Both count only the streams this replica holds, so with R replicas a user can hold up to R times
the per-user cap. A slot is taken before any lookup or await, so two calls racing for the last
slot cannot both get it.
"""

from __future__ import annotations

import threading


class Admission:
    """Counts open chats, in total and per user; `max_per_user` 0 means no per-user cap."""

    def __init__(self, max_total: int, max_per_user: int) -> None:
        self.max_total, self.max_per_user = max_total, max_per_user
        self.total = 0
        self._by_user: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str) -> str | None:
        """Take a slot for `user`: None if taken, else the refusal reason ("capacity" or "user_concurrency")."""
        with self._lock:
            if self.total >= self.max_total:
                return "capacity"
            held = self._by_user.get(user, 0)
            if self.max_per_user and held >= self.max_per_user:
                return "user_concurrency"
            self.total += 1
            self._by_user[user] = held + 1
            return None

    def release(self, user: str) -> None:
        with self._lock:
            held = self._by_user.get(user, 0)
            if held <= 0:
                return
            self.total -= 1
            if held == 1:
                del self._by_user[user]  # idle users cost no memory
            else:
                self._by_user[user] = held - 1

    def held(self, user: str) -> int:
        with self._lock:
            return self._by_user.get(user, 0)
