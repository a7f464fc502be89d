"""python -m services.feedback: the feedback sink (health + metrics on its gRPC port)."""

from __future__ import annotations

from pathlib import Path

from services.common import config, grpc_server, runtime
from services.feedback.config import DEFAULTS, FeedbackConfig
from services.feedback.worker import FeedbackSink


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("feedback", DEFAULTS)
    cfg = config.load_or_exit(FeedbackConfig)
    await boot.ensure_topics()
    sink = FeedbackSink(boot.kafka, Path(cfg.dataset_dir), boot.instance)
    return grpc_server.ServiceApp("feedback", boot.server, [], workers=[sink])


if __name__ == "__main__":
    grpc_server.run(build)
