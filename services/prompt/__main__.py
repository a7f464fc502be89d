"""python -m services.prompt: PromptService on GRPC_PORT (default 50054) + the prompt stage."""

from __future__ import annotations

import asyncio
import socket
import sys

from colloquy.v1 import prompt_pb2_grpc

from services.common import config, grpc_server, log, topics
from services.conversation.reader import HistoryReader
from services.prompt import templates as templates_mod
from services.prompt.config import DEFAULTS, PromptConfig
from services.prompt.domain import Assembler
from services.prompt.pending import TurnTracker
from services.prompt.servicer import PromptServicer
from services.prompt.worker import make_handler, make_unanswered_handler, make_unanswered_worker, make_worker
from services.tokenizer import model_files
from services.tokenizer.domain import TextTokenizer


def _exit_config_error(exc: Exception) -> None:
    print(f"configuration error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


async def build() -> grpc_server.ServiceApp:
    server = config.load_or_exit(config.ServerConfig, defaults=DEFAULTS)
    cfg = config.load_or_exit(PromptConfig)
    kafka = config.load_or_exit(config.KafkaConfig)
    logger = log.setup("prompt", server.log_level)
    try:
        path = model_files.resolve_tokenizer_dir(cfg.tokenizer_path)
        context = min(model_files.context_tokens(path, cfg.context_tokens), cfg.slot_tokens)
        templates = templates_mod.load_file(cfg.templates_file)
    except (config.ConfigError, templates_mod.TemplateError) as exc:
        _exit_config_error(exc)
    tok = TextTokenizer.from_file(str(path / model_files.TOKENIZER_FILE))
    assembler = Assembler(tok, context)
    logger.info("prompt assembler ready", extra={
        "tokenizer": str(path), "context_tokens": context, "template_version": templates.current,
        "template_versions": sorted(templates.versions)})

    if kafka.create_topics:
        wanted = {topics.CONVERSATION_TURNS.name}
        if cfg.kafka_worker:
            wanted |= {cfg.topic_in, cfg.topic_out, topics.CHAT_UNANSWERED.name}
        await asyncio.get_running_loop().run_in_executor(
            None, topics.ensure_topics, kafka.bootstrap_servers, [t for t in topics.ALL if t.name in wanted], kafka)
    reader = HistoryReader(kafka).start()
    tracker = TurnTracker(ttl_ms=int(cfg.pending_ttl_s * 1000))
    workers = []
    if cfg.kafka_worker:
        handler = make_handler(assembler, templates, tracker, reader, cfg)
        instance = server.instance_id or socket.gethostname()
        workers.append(make_worker(handler, cfg, kafka, instance))
        workers.append(make_unanswered_worker(make_unanswered_handler(tracker), cfg, kafka, instance))
    svc = grpc_server.Service("colloquy.v1.PromptService", prompt_pb2_grpc.add_PromptServiceServicer_to_server,
                              PromptServicer(assembler, templates, tracker, reader, cfg))
    return grpc_server.ServiceApp("prompt", server, [svc], workers=workers, on_stop=[reader.stop])


if __name__ == "__main__":
    grpc_server.run(build)
