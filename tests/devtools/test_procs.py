"""devtools.procs: terminate (a graceful stop first, SIGKILL for a child that ignores it) and free_port."""

from __future__ import annotations

import signal
import socket
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


def test_free_port_is_bindable_outside_the_ephemeral_range_and_never_repeats() -> None:
    """Outgoing connections take their local ports from the ephemeral range, so a port picked
    there can be gone before the server binds it; picks come from below it."""
    low = procs._ephemeral_low()
    ports = [procs.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low - procs._FLOOR >= 1000:
        assert all(procs._FLOOR <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
