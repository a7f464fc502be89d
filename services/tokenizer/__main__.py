"""python -m services.tokenizer: TokenizerService on GRPC_PORT (default 50052) + the tokenizer stage."""

from __future__ import annotations

from colloquy.v1 import tokenizer_pb2_grpc

from services.common import config, grpc_server, runtime, topics
from services.tokenizer import model_files
from services.tokenizer.config import DEFAULTS, TokenizerConfig
from services.tokenizer.domain import TextTokenizer
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.worker import make_worker


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("tokenizer", DEFAULTS)
    cfg = config.load_or_exit(TokenizerConfig)
    try:
        path = model_files.resolve_tokenizer_dir(cfg.tokenizer_path)
    except config.ConfigError as exc:
        config.exit_config_error(exc)
    tok = TextTokenizer.from_file(str(path / model_files.TOKENIZER_FILE))
    boot.log.info("tokenizer loaded", extra={"path": str(path), "vocab_size": tok.vocab_size})
    workers = []
    if cfg.kafka_worker:
        outputs = [topics.renamed(topics.CHAT_TOKENIZED, cfg.topic_out)] if cfg.topic_out else []
        await boot.ensure_topics(topics.renamed(topics.CHAT_REQUESTS, cfg.topic_in), *outputs)
        workers.append(make_worker(tok, cfg, boot.kafka, boot.instance))
    svc = grpc_server.Service("colloquy.v1.TokenizerService",
                              tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, TokenizerServicer(tok))
    return grpc_server.ServiceApp("tokenizer", boot.server, [svc], workers=workers)


if __name__ == "__main__":
    grpc_server.run(build)
