"""python -m services.tokenizer: TokenizerService on GRPC_PORT (default 50052) + the tokenizer stage."""

from __future__ import annotations

import asyncio
import socket
import sys

from colloquy.v1 import tokenizer_pb2_grpc

from services.common import config, grpc_server, log, topics
from services.tokenizer import model_files
from services.tokenizer.config import DEFAULTS, TokenizerConfig
from services.tokenizer.domain import TextTokenizer
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.worker import make_worker


async def build() -> grpc_server.ServiceApp:
    server = config.load_or_exit(config.ServerConfig, defaults=DEFAULTS)
    cfg = config.load_or_exit(TokenizerConfig)
    logger = log.setup("tokenizer", server.log_level)
    try:
        path = model_files.resolve_tokenizer_dir(cfg.tokenizer_path)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    tok = TextTokenizer.from_file(str(path / model_files.TOKENIZER_FILE))
    logger.info("tokenizer loaded", extra={"path": str(path), "vocab_size": tok.vocab_size})
    workers = []
    if cfg.kafka_worker:
        kafka = config.load_or_exit(config.KafkaConfig)
        if kafka.create_topics:
            await asyncio.get_running_loop().run_in_executor(
                None, topics.ensure_topics, kafka.bootstrap_servers,
                [t for t in topics.ALL if t.name in (cfg.topic_in, cfg.topic_out)], kafka)
        workers.append(make_worker(tok, cfg, kafka, server.instance_id or socket.gethostname()))
    svc = grpc_server.Service("colloquy.v1.TokenizerService",
                              tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, TokenizerServicer(tok))
    return grpc_server.ServiceApp("tokenizer", server, [svc], workers=workers)


if __name__ == "__main__":
    grpc_server.run(build)
