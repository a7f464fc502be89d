"""python -m services.conversation: the materializer of `conversation.turns` into the store
(health and metrics on its gRPC port; NOT_SERVING until the store is migrated and caught up)
and the retention sweep (CONVERSATION_RETENTION_DAYS)."""

from __future__ import annotations

from services.common import config, grpc_server, kafka_loop, runtime, topics
from services.conversation.config import DEFAULTS, ConversationConfig
from services.conversation.db import ConversationDB
from services.conversation.retention import RetentionSweeper
from services.conversation.worker import Materializer, kill_before_commit


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("conversation", DEFAULTS)
    cfg = config.load_or_exit(ConversationConfig)
    await boot.ensure_topics(topics.renamed(topics.CONVERSATION_TURNS, cfg.topic))
    db = ConversationDB(cfg.url, cfg.busy_timeout_ms)
    worker = Materializer(
        db, boot.kafka, topic=cfg.topic, group_id=cfg.group_id, instance_id=boot.instance,
        retry_seconds=cfg.retry_seconds,
        before_commit=kill_before_commit(cfg.fault_kill_before_commit) if cfg.fault_kill_before_commit else None)
    sweeper = RetentionSweeper(
        db, lambda: kafka_loop.make_producer(boot.kafka, f"conversation-{boot.instance}-retention"),
        days=cfg.retention_days, interval_s=cfg.retention_sweep_s, turns_topic=cfg.topic, store_ready=worker.ready)
    return grpc_server.ServiceApp("conversation", boot.server, [], workers=[worker, sweeper], on_stop=[db.close],
                                  readiness=worker.ready)


if __name__ == "__main__":
    grpc_server.run(build)
