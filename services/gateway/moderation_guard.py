"""Fail closed on moderation: the gateway refuses new chats while moderation cannot check them.

In the pipeline no text can skip moderation (only text the moderation stages released reaches a
gateway), so a moderation outage would otherwise show up as chats that hang until their idle
timeout. This watches moderation's standard gRPC health (`grpc.health.v1`, the same check
Kubernetes probes) and lets the servicer refuse at once with UNAVAILABLE and a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls

log = logging.getLogger(__name__)

SERVICE = "colloquy.v1.ModerationService"


class ModerationGuard:
    """`available` is False after `failures` checks in a row fail, time out or say NOT_SERVING."""

    def __init__(self, address: str, interval_s: float = 1.0, timeout_s: float = 2.0, failures: int = 3,
                 service: str = SERVICE) -> None:
        self.address = address
        self.service = service
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self._bad = 0
        self.available = True  # until proven otherwise: the first check runs at once
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    def _new_channel(self) -> grpc.aio.Channel:
        # grpc's default reconnect backoff grows to minutes while the peer is down; a health
        # watcher must notice a recovery within a poll, so retry the connection at least every 1 s.
        return tls.insecure_or_secure_channel(  # type: ignore[return-value]
            self.address, aio=True, options=[("grpc.initial_reconnect_backoff_ms", 200),
                                             ("grpc.max_reconnect_backoff_ms", 1000),
                                             ("grpc.min_reconnect_backoff_ms", 200)])

    async def _check(self, channel: grpc.aio.Channel) -> bool:
        try:
            # wait_for_ready: a channel between reconnect attempts waits (within the timeout)
            # instead of failing the check at once.
            res = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout_s, wait_for_ready=True)
            return res.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    def _record(self, ok: bool) -> None:
        self._bad = 0 if ok else self._bad + 1
        was, self.available = self.available, self._bad < self.failures
        if was != self.available:
            log.warning("moderation is %s", "available again" if self.available else "unavailable",
                        extra={"moderation": self.address})

    async def check_once(self) -> bool:
        if self._channel is None:
            self._channel = self._new_channel()
        ok = await self._check(self._channel)
        self._record(ok)
        return ok

    async def confirm_unavailable(self) -> bool:
        """Before refusing a chat, look again: the background check may lag a recovery by a poll."""
        if self.available:
            return False
        if self._channel is not None and self._channel.get_state() == grpc.ChannelConnectivity.READY:
            ok = await self._check(self._channel)
        else:
            # A channel in reconnect backoff may not dial again within the check's timeout (the
            # backoff is up to 1 s plus 20% jitter); a fresh one dials at once. It is a channel of
            # its own: closing the shared one would cancel the background check in flight on it.
            fresh = self._new_channel()
            try:
                ok = await self._check(fresh)
            finally:
                await fresh.close()
        self._record(ok)
        return not ok and not self.available

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # the watcher must outlive any one check: a dead one never flips back
                log.exception("moderation health check failed unexpectedly")
                self._record(False)
            await asyncio.sleep(self.interval_s)

    def start(self) -> ModerationGuard:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def cancel(self) -> None:
        """Stop checking (from synchronous shutdown code)."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()
