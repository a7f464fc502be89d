"""python -m services.prompt: PromptService on GRPC_PORT (default 50054) + the prompt stage."""

from __future__ import annotations

from colloquy.v1 import prompt_pb2_grpc

from services.common import config, grpc_server, runtime, topics
from services.conversation import reader as store_reader
from services.prompt import templates as templates_mod
from services.prompt.config import DEFAULTS, HistoryStoreConfig, PromptConfig
from services.prompt.domain import Assembler
from services.prompt.pending import TurnTracker
from services.prompt.servicer import PromptServicer
from services.prompt.worker import (
    HistoryPrefetch,
    make_handler,
    make_unanswered_handler,
    make_unanswered_worker,
    make_worker,
)
from services.tokenizer import model_files
from services.tokenizer.domain import TextTokenizer


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("prompt", DEFAULTS)
    cfg = config.load_or_exit(PromptConfig)
    try:
        path = model_files.resolve_tokenizer_dir(cfg.tokenizer_path)
        context = min(model_files.context_tokens(path, cfg.context_tokens), cfg.slot_tokens)
        templates = templates_mod.load_file(cfg.templates_file)
    except (config.ConfigError, templates_mod.TemplateError) as exc:
        config.exit_config_error(exc)
    tok = TextTokenizer.from_file(str(path / model_files.TOKENIZER_FILE))
    assembler = Assembler(tok, context)
    boot.log.info("prompt assembler ready", extra={
        "tokenizer": str(path), "context_tokens": context, "template_version": templates.current,
        "template_versions": sorted(templates.versions)})

    await boot.ensure_topics(topics.renamed(topics.CHAT_MODERATED, cfg.topic_in),
                             topics.renamed(topics.CHAT_PROMPTS, cfg.topic_out))
    reader = store_reader.open_reader(boot.kafka, config.load_or_exit(HistoryStoreConfig))
    tracker = TurnTracker(ttl_ms=int(cfg.pending_ttl_s * 1000))
    workers: list[runtime.ThreadWorker] = []
    if cfg.kafka_worker:
        prefetch = HistoryPrefetch(reader, cfg)
        handler = make_handler(assembler, templates, tracker, reader, cfg, prefetch=prefetch)
        workers.append(make_worker(handler, cfg, boot.kafka, boot.instance, prefetch))
        workers.append(make_unanswered_worker(make_unanswered_handler(tracker), cfg, boot.kafka, boot.instance))
    workers.append(reader)  # NOT_SERVING until the store is reachable and caught up
    svc = grpc_server.Service("colloquy.v1.PromptService", prompt_pb2_grpc.add_PromptServiceServicer_to_server,
                              PromptServicer(assembler, templates, tracker, reader, cfg))
    return grpc_server.ServiceApp("prompt", boot.server, [svc], workers=workers, on_stop=[reader.db.close],
                                  readiness=lambda: reader.is_ready)


if __name__ == "__main__":
    grpc_server.run(build)
