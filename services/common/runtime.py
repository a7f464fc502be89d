"""The process runtime every service shares: bootstrap, background thread workers, topics.

Why one module: each `__main__` used to load its config, pick its replica id, create its
topics and run its worker threads by hand, each a little differently (one replica id fell back
to "0", so two replicas fenced each other's transactions). A `__main__` now only wires its
domain objects to these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import logging
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Self

from services.common import config, log, topics

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Boot:
    """What every service starts from: its settings, its replica id and its logger."""

    service: str
    server: config.ServerConfig
    kafka: config.KafkaConfig
    instance: str  # unique per replica, stable across its restarts (ServerConfig.instance)
    log: logging.Logger

    async def ensure_topics(self, *extra: topics.Topic) -> None:
        """Create Colloquy's topics and `extra` (renamed or per-replica ones) when missing,
        off the event loop; nothing when KAFKA_CREATE_TOPICS is off."""
        await asyncio.get_running_loop().run_in_executor(None, ensure_topics, self.kafka, extra)


def bootstrap(service: str, defaults: Mapping[str, str] | None = None) -> Boot:
    """Load the shared settings, set up JSON logs and settle the replica id, or print one
    configuration error line and exit 2 before anything is served."""
    server = config.load_or_exit(config.ServerConfig, defaults=defaults)
    kafka = config.load_or_exit(config.KafkaConfig)
    try:
        instance = server.instance()
    except config.ConfigError as exc:
        config.exit_config_error(exc)
    logger = log.setup(service, server.log_level)
    dump_threads_on_sigusr1()
    return Boot(service, server, kafka, instance, logger)


def dump_threads_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's stack to stderr and the process goes on: what a
    service stuck without a log line is doing (`devtools.procs.Proc.thread_dump` uses it when a
    test's process never becomes ready)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def ensure_topics(kafka: config.KafkaConfig, extra: Sequence[topics.Topic] = ()) -> list[str]:
    """The one topic-ensure of every service: `topics.ALL` plus `extra`, if KAFKA_CREATE_TOPICS
    is on (on Kubernetes an operator owns the topics). Returns the names created."""
    if not kafka.create_topics:
        return []
    wanted = {t.name: t for t in (*topics.ALL, *extra)}  # a renamed topic replaces nothing
    return topics.ensure_topics(kafka.bootstrap_servers, list(wanted.values()), kafka)


class ThreadWorker:
    """A service's background loop on its own daemon thread: start, stop, ready, error.

    Subclasses write `run()`, which returns once `stopping` is set; `mark_ready()` when they can
    serve. An exception out of `run()` is logged and kept in `error`: ServiceApp then exits
    non-zero so the supervisor restarts the process (a loop that should ride out broker
    restarts catches those itself).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start the thread; a second call does nothing (a worker started early, e.g. one the
        server must wait for, can still be handed to ServiceApp)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._guarded, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask `run()` to return and wait up to `timeout` seconds for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def mark_ready(self) -> None:
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once ready; False after `timeout`, or at once when the worker has died."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.error is not None or time.monotonic() >= deadline:
                return False
        return True

    def run(self) -> None:
        raise NotImplementedError

    def _guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced to ServiceApp, which exits non-zero
            self.error = exc
            _log.exception("worker crashed", extra={"worker": self.name})


def first_dead(workers: Iterable[ThreadWorker]) -> ThreadWorker | None:
    """A worker whose loop died, if any: the process should exit so its supervisor restarts it."""
    return next((w for w in workers if getattr(w, "error", None) is not None), None)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (for a process that serves no asyncio loop)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_workers(workers: Sequence[ThreadWorker], stop: threading.Event, logger: logging.Logger,
                serving: Mapping[str, object], stop_timeout: float = 30.0) -> int:
    """Start `workers`, log "serving" with `serving`, wait for `stop` or one of them dying, then
    stop them; returns the exit code.

    What ServiceApp does for a gRPC service, for a process without a gRPC server of its own
    (generation: Ray Serve answers its gRPC)."""
    for w in workers:
        w.start()
    logger.info("serving", extra=dict(serving))
    code = 0
    while not stop.wait(1.0):
        dead = first_dead(workers)
        if dead is not None:
            logger.error("a worker died; exiting so the supervisor restarts us",
                         extra={"worker": getattr(dead, "name", type(dead).__name__)})
            code = 1
            break
    logger.info("shutting down", extra={"stop_timeout_s": stop_timeout})
    for w in workers:
        w.stop(stop_timeout)
    return code
