"""python -m services.gateway: the ChatService on GRPC_PORT (default 50051)."""

from __future__ import annotations

import asyncio
import socket
import uuid

from colloquy.v1 import chat_pb2_grpc

from services.common import config, grpc_server, kafka_loop, log, topics
from services.conversation.reader import HistoryReader
from services.gateway.auth import KeyRing
from services.gateway.config import DEFAULTS, GatewayConfig
from services.gateway.moderation_guard import ModerationGuard
from services.gateway.replies import ReplyRouter
from services.gateway.servicer import ChatServicer


async def build() -> grpc_server.ServiceApp:
    server = config.load_or_exit(config.ServerConfig, defaults=DEFAULTS)
    kafka = config.load_or_exit(config.KafkaConfig)
    cfg = config.load_or_exit(GatewayConfig)
    logger = log.setup("gateway", server.log_level)
    instance = server.instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    reply = topics.reply_topic(instance)
    loop = asyncio.get_running_loop()
    if kafka.create_topics:
        await loop.run_in_executor(None, topics.ensure_topics, kafka.bootstrap_servers,
                                   [*topics.ALL, reply], kafka)
    keys = KeyRing(cfg.api_keys_file)
    history = HistoryReader(kafka).start()
    router = ReplyRouter(kafka, reply.name, loop).start()
    await loop.run_in_executor(None, router.wait_ready, 60.0)
    producer = kafka_loop.make_producer(kafka, f"gateway-{instance}")
    guard = ModerationGuard(cfg.moderation_addr).start() if cfg.moderation_addr else None
    servicer = ChatServicer(cfg, keys, history, router, producer, reply.name, guard)
    logger.info("gateway ready", extra={"instance": instance, "reply_topic": reply.name})

    def close() -> None:
        if guard is not None:
            guard.cancel()
        router.stop()
        history.stop()
        producer.close(timeout=5)

    return grpc_server.ServiceApp(
        "gateway", server,
        [grpc_server.Service("colloquy.v1.ChatService", chat_pb2_grpc.add_ChatServiceServicer_to_server, servicer)],
        on_stop=[close], max_receive_bytes=cfg.max_request_bytes)


if __name__ == "__main__":
    grpc_server.run(build)
