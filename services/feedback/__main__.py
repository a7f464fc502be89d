"""python -m services.feedback: the feedback sink (health + metrics on its gRPC port)."""

from __future__ import annotations

from pathlib import Path

from services.common import config, grpc_server, log, topics
from services.feedback.config import DEFAULTS, FeedbackConfig
from services.feedback.worker import FeedbackSink


async def build() -> grpc_server.ServiceApp:
    server = config.load_or_exit(config.ServerConfig, defaults=DEFAULTS)
    kafka = config.load_or_exit(config.KafkaConfig)
    cfg = config.load_or_exit(FeedbackConfig)
    log.setup("feedback", server.log_level)
    if kafka.create_topics:
        topics.ensure_topics(kafka.bootstrap_servers, kafka=kafka)
    sink = FeedbackSink(kafka, Path(cfg.dataset_dir), server.instance_id or "0")
    return grpc_server.ServiceApp("feedback", server, [], workers=[sink])


if __name__ == "__main__":
    grpc_server.run(build)
