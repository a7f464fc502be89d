"""A pipeline stage built on the shared Kafka loop, used to test delivery guarantees.

It reads TurnEvents from STAGE_IN, upper-cases the message and writes it to STAGE_OUT.
A message "fail" always raises (to be dead-lettered after retries); a message "to:<topic> ..."
is written to <topic> instead (a reply topic, say); STAGE_DELAY_S slows each record so a test
can SIGKILL the process in the middle of a batch. STAGE_LOSE_FETCHES_AFTER=n makes the consumers
that exist after the n-th record never send a FetchRequest again (the kafka-python stall that
kafka_loop.LagProbe is there for); a consumer made afterwards fetches normally."""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable

from colloquy.v1 import events_pb2

from services.common import config, grpc_server, kafka_loop, runtime


@dataclasses.dataclass(frozen=True)
class StageConfig:
    topic_in: str = config.env("STAGE_IN")
    topic_out: str = config.env("STAGE_OUT")
    group: str = config.env("STAGE_GROUP")
    delay_s: float = config.env("STAGE_DELAY_S", 0.0)
    lose_fetches_after: int = config.env("STAGE_LOSE_FETCHES_AFTER", 0)


def lose_fetches_on_demand() -> Callable[[], None]:
    """Fault injection (test only): calling the returned function makes every fetcher that exists
    at that moment stop sending fetches."""
    from kafka.consumer.fetcher import Fetcher

    alive: weakref.WeakSet = weakref.WeakSet()
    lost: weakref.WeakSet = weakref.WeakSet()
    init, send = Fetcher.__init__, Fetcher.send_fetches

    def tracked_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        alive.add(self)

    def maybe_send(self):  # type: ignore[no-untyped-def]
        return None if self in lost else send(self)

    Fetcher.__init__, Fetcher.send_fetches = tracked_init, maybe_send  # type: ignore[method-assign]
    return lambda: lost.update(alive)


def main() -> None:
    cfg = config.load_or_exit(StageConfig)
    boot = runtime.bootstrap("sample-stage")
    lose_fetches = lose_fetches_on_demand() if cfg.lose_fetches_after else None
    handled = 0

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]):
        nonlocal handled
        handled += 1
        if lose_fetches is not None and handled == cfg.lose_fetches_after:
            lose_fetches()
            print("fetches lost", flush=True)
        if cfg.delay_s:
            time.sleep(cfg.delay_s)
        if ev.message.message.startswith("fail"):
            raise RuntimeError("this message always fails")
        out = events_pb2.TurnEvent()
        out.CopyFrom(ev.message)
        out.message = ev.message.message.upper()
        first = ev.message.message.split(" ", 1)[0]
        topic = first[3:] if first.startswith("to:") else cfg.topic_out
        print(f"processed {ev.message.request_id}", flush=True)
        yield ev.out(topic, out)

    worker = kafka_loop.StageWorker("sample", [cfg.topic_in], events_pb2.TurnEvent, handle, boot.kafka,
                                    group_id=cfg.group, instance_id=boot.instance)

    async def build() -> grpc_server.ServiceApp:
        return grpc_server.ServiceApp("sample-stage", boot.server, [], workers=[worker])

    grpc_server.run(build)


if __name__ == "__main__":
    main()
