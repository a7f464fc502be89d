"""The gateway's fail-closed watch on a real gRPC health endpoint (the kit's sample server)."""

from __future__ import annotations

import asyncio
import signal

from services.gateway.moderation_guard import ModerationGuard
from tests.common.procs import Proc
from tests.conftest import free_port


def test_down_then_up_then_frozen() -> None:
    async def scenario() -> list[bool]:
        port = free_port()
        guard = ModerationGuard(f"127.0.0.1:{port}", timeout_s=1.0, service="colloquy.v1.TokenizerService")
        seen = []
        for _ in range(4):  # nothing listens yet: three failures make it unavailable
            await guard.check_once()
        seen.append(guard.available)
        proc = Proc("tests.common.sample_server", {"GRPC_PORT": str(port), "METRICS_PORT": str(free_port())})
        try:
            proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=30)
            # A refusal looks again first: a server that just came up is not refused, even though
            # the channel had been failing (reconnect backoff is capped at 1 s).
            seen.append(await guard.confirm_unavailable())
            seen.append(guard.available)
            proc.signal(signal.SIGSTOP)  # up but not answering: too slow counts as unavailable
            for _ in range(3):
                await guard.check_once()
            seen.append(guard.available)
            proc.signal(signal.SIGCONT)
            await asyncio.sleep(0.5)
            seen.append(await guard.confirm_unavailable())
        finally:
            proc.signal(signal.SIGCONT)
            proc.kill()
            await guard.stop()
        return seen

    assert asyncio.run(scenario()) == [False, False, True, False, False]
