"""devtools.procs.terminate: a graceful stop first, SIGKILL for a child that ignores it."""

from __future__ import annotations

import signal
import subprocess
import sys

from devtools import procs


def test_terminate_stops_a_child_with_sigterm() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.terminate(child, 10)
    assert child.returncode == -signal.SIGTERM


def test_terminate_kills_a_child_that_ignores_sigterm() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    procs.terminate(child, 0.5)
    assert child.returncode == -signal.SIGKILL
