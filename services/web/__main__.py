"""python -m services.web: the OpenAI-compatible HTTP API on WEB_PORT (default 8080), Prometheus
/metrics on METRICS_PORT (default 9108)."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from model.registry import Registry
from services.common import config, log, metrics
from services.common.auth import KeyRing
from services.web.app import Backend, build_app
from services.web.config import WebConfig


async def main() -> None:
    cfg = config.load_or_exit(WebConfig)
    logger = log.setup("web", cfg.log_level)
    backend = Backend(cfg, KeyRing(cfg.api_keys_file), Registry())
    metrics_port = metrics.serve_metrics(cfg.metrics_port, cfg.host)
    server = uvicorn.Server(uvicorn.Config(
        build_app(backend), host=cfg.host, port=cfg.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(cfg.grace_seconds), lifespan="off"))
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        logger.info("serving", extra={"port": port, "metrics_port": metrics_port, "gateway": cfg.gateway_addr,
                                      "moderation": cfg.moderation_addr})
    try:
        await task
    finally:
        await backend.close()
        logging.getLogger("web").info("stopped")


if __name__ == "__main__":
    asyncio.run(main())
