"""The gateway's fail-closed watch on a real gRPC health endpoint (the kit's sample server)."""

from __future__ import annotations

import asyncio
import signal

from devtools.procs import Proc, free_port
from services.gateway.moderation_guard import ModerationGuard


async def confirmed_available(guard: ModerationGuard, within_s: float = 15.0) -> bool:
    """confirm_unavailable() until it answers False (each call dials afresh), for at most `within_s`:
    on a loaded machine a server just resumed can miss the 1 s check once; the behaviour under test
    is that a confirm sees the recovery without the background watch, not how fast."""
    deadline = asyncio.get_running_loop().time() + within_s
    while await guard.confirm_unavailable():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


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
            seen.append(not await confirmed_available(guard))
            seen.append(guard.available)
            proc.signal(signal.SIGSTOP)  # up but not answering: too slow counts as unavailable
            for _ in range(3):
                await guard.check_once()
            seen.append(guard.available)
            proc.signal(signal.SIGCONT)
            await asyncio.sleep(0.5)
            seen.append(not await confirmed_available(guard))
        finally:
            proc.signal(signal.SIGCONT)
            proc.kill()
            await guard.stop()
        return seen

    assert asyncio.run(scenario()) == [False, False, True, False, False]



def test_a_confirm_leaves_the_background_watch_running() -> None:
    """A confirm on a channel that is not READY dials a channel of its own. Closing the shared one
    instead cancelled the background check in flight on it (grpc.aio raises CancelledError there),
    which ended the watch for good: the guard then stayed "available" through a later outage."""

    async def scenario() -> tuple[bool, bool]:
        guard = ModerationGuard(f"127.0.0.1:{free_port()}", interval_s=0.1, timeout_s=2.0, failures=1,
                                service="colloquy.v1.TokenizerService").start()
        await asyncio.sleep(0.3)  # its first check is in flight: nothing listens, it waits for ready
        guard.available = False
        refused = await guard.confirm_unavailable()
        await asyncio.sleep(0.1)
        alive = guard._task is not None and not guard._task.done()
        await guard.stop()
        return refused, alive

    assert asyncio.run(scenario()) == (True, True)
