"""A pipeline stage built on the shared Kafka loop, used to test delivery guarantees.

It reads TurnEvents from STAGE_IN, upper-cases the message and writes it to STAGE_OUT.
A message "fail" always raises (to be dead-lettered after retries); a message "to:<topic> ..."
is written to <topic> instead (a reply topic, say); STAGE_DELAY_S slows each record so a test
can SIGKILL the process in the middle of a batch."""

from __future__ import annotations

import dataclasses
import time

from colloquy.v1 import events_pb2

from services.common import config, grpc_server, kafka_loop, runtime


@dataclasses.dataclass(frozen=True)
class StageConfig:
    topic_in: str = config.env("STAGE_IN")
    topic_out: str = config.env("STAGE_OUT")
    group: str = config.env("STAGE_GROUP")
    delay_s: float = config.env("STAGE_DELAY_S", 0.0)


def main() -> None:
    cfg = config.load_or_exit(StageConfig)
    boot = runtime.bootstrap("sample-stage")

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]):
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
