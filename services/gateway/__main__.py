"""python -m services.gateway: the ChatService on GRPC_PORT (default 50051)."""

from __future__ import annotations

import asyncio

from colloquy.v1 import chat_pb2_grpc

from services.common import config, grpc_server, kafka_loop, runtime, topics
from services.common.auth import KeyRing
from services.conversation import reader as store_reader
from services.gateway import metrics, reply_topics
from services.gateway.config import DEFAULTS, GatewayConfig, HistoryStoreConfig
from services.gateway.moderation_guard import ModerationGuard
from services.gateway.replies import ReplyRouter
from services.gateway.reply_topics import ReplyTopicJanitor
from services.gateway.servicer import ChatServicer


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("gateway", DEFAULTS)
    cfg = config.load_or_exit(GatewayConfig)
    reply = topics.reply_topic(boot.instance)
    loop = asyncio.get_running_loop()
    await boot.ensure_topics(reply)
    keys = KeyRing(cfg.api_keys_file, metrics.api_keys_reloaded)
    store = store_reader.open_reader(boot.kafka, config.load_or_exit(HistoryStoreConfig))
    router = ReplyRouter(boot.kafka, reply.name, loop,
                         reply_topics.mark_interval_s(cfg.reply_topic_max_idle_s)).start()
    await loop.run_in_executor(None, router.wait_ready, 60.0)  # no chat before its replies can be heard
    producer = kafka_loop.make_producer(boot.kafka, f"gateway-{boot.instance}")
    guard = ModerationGuard(cfg.moderation_addr).start() if cfg.moderation_addr else None
    janitor = ReplyTopicJanitor(boot.kafka, reply.name, cfg.reply_topic_max_idle_s)  # gone gateways' topics
    servicer = ChatServicer(cfg, keys, store, router, producer, reply.name, guard)
    boot.log.info("gateway ready", extra={"instance": boot.instance, "reply_topic": reply.name})

    def close() -> None:
        if guard is not None:
            guard.cancel()
        producer.close(timeout=5)
        store.db.close()

    return grpc_server.ServiceApp(
        "gateway", boot.server,
        [grpc_server.Service("colloquy.v1.ChatService", chat_pb2_grpc.add_ChatServiceServicer_to_server, servicer)],
        workers=[router, store, janitor], on_stop=[close], max_receive_bytes=cfg.max_request_bytes,
        readiness=lambda: store.is_ready)  # NOT_SERVING until the store is reachable and caught up


if __name__ == "__main__":
    grpc_server.run(build)
