"""Service processes the way production runs them (separate OS processes), for tests and benchmarks."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Ports handed out by this process: a later pick never repeats one, even if it is free again.
_GIVEN: set[int] = set()
# Below the kernel's ephemeral range, above Ray's worker ports (10002-19999 by default).
_FLOOR = 20_000
_RANDOM = random.SystemRandom()  # not the module's generator, which a test or benchmark may seed


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A loopback TCP port free at this moment, for a server that binds it soon.

    Picked below the kernel's ephemeral range: a port the OS picks (bind to 0) comes from that
    range, which is also where every outgoing connection gets its local port, so a Kafka client
    connecting in between could take it first (CI, 2026-12-04: the conversation service's gRPC
    port, "Address already in use", and every dashboard test failed with the stack). Outside it,
    only another explicit bind can; where the range leaves no room below it, the OS picks.
    """
    low = _ephemeral_low()
    for _ in range(200 if low - _FLOOR >= 1000 else 0):
        port = _RANDOM.randrange(_FLOOR, low)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _GIVEN.add(port)
    return port


def terminate(popen: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running after `timeout` seconds."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(10)


class Proc:
    """A child Python process with captured stderr (JSON logs)."""

    def __init__(self, module: str, env: dict[str, str], args: list[str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "build" / "python")])
        logs = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = logs / f"colloquy-test-{module}-{os.getpid()}-{time.time_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.popen = subprocess.Popen([sys.executable, "-m", module, *(args or [])], env=full_env,
                                      stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.output()):
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"process exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"timed out; output:\n{self.output()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def thread_dump(self, settle_s: float = 1.0) -> str:
        """Every thread's stack, from a service (its runtime prints them on SIGUSR1); "" once it
        has exited. For the error of a process that never became ready."""
        if self.popen.poll() is not None:
            return ""
        before = len(self.output())
        self.signal(signal.SIGUSR1)
        time.sleep(settle_s)
        return self.output()[before:]

    def diagnosis(self, log_chars: int = 4000) -> str:
        """The log's tail and, while it runs, every thread's stack: for the error of a wait on it."""
        dump = self.thread_dump()[-6000:]
        return f"\nits log:\n{self.output()[-log_chars:]}" + (f"\nits threads:\n{dump}" if dump else "")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)
