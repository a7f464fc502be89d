"""python -m services.conversation: the materializer of `conversation.turns` into the store
(health and metrics on its gRPC port; NOT_SERVING until the store is migrated and caught up)."""

from __future__ import annotations

from services.common import config, grpc_server, runtime, topics
from services.conversation.config import DEFAULTS, ConversationConfig
from services.conversation.db import ConversationDB
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
    return grpc_server.ServiceApp("conversation", boot.server, [], workers=[worker], on_stop=[db.close],
                                  readiness=worker.ready)


if __name__ == "__main__":
    grpc_server.run(build)
