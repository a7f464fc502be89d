"""``python -m services.moderation``: the ModerationService gRPC API plus the input and output
Kafka stages (MODERATION_STAGES selects them), in one process sharing one loaded model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from colloquy.v1 import events_pb2, moderation_pb2_grpc

from services.common import config, grpc_server, kafka_loop, runtime, topics
from services.moderation import paths
from services.moderation.classifier import ClassifierError, Heads
from services.moderation.config import ModerationConfig
from services.moderation.domain import Moderator
from services.moderation.embedder import Embedder, ModelMissing
from services.moderation.leak import LeakDetector, hidden_texts
from services.moderation.policy import PolicyError
from services.moderation.policy import load as load_policy
from services.moderation.servicer import ModerationServicer
from services.moderation.worker import InputStage, OutputStage
from services.prompt.templates import TemplateError
from services.prompt.templates import load_file as load_templates

DEFAULTS = {"GRPC_PORT": "50053", "METRICS_PORT": "9103"}


def _fail(message: str) -> None:
    print(f"moderation: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def load_moderator(cfg: ModerationConfig) -> Moderator:
    """The model, heads and policy, or a one-line error and exit 2 before serving anything."""
    try:
        policy = load_policy(cfg.policy_file)
        heads = Heads.load(cfg.classifier_file)
        embedder = Embedder(Path(cfg.model_dir) if cfg.model_dir else paths.model_dir(), threads=cfg.threads,
                            precision=cfg.precision)
    except (PolicyError, ClassifierError, ModelMissing) as exc:
        _fail(str(exc))
    if heads.meta.get("embedder") != embedder.model_id:
        logging.getLogger(__name__).warning("classifier was trained on another encoder build", extra={
            "trained_on": heads.meta.get("embedder"), "serving": embedder.model_id})
    moderator = Moderator(embedder, heads, policy)
    moderator.moderate(["warm-up"], ["warm-up"])  # first ONNX run allocates; keep it off a request
    return moderator


def load_leak_detector(cfg: ModerationConfig, moderator: Moderator) -> LeakDetector | None:
    """The hidden instructions of every template version, or None when the policy has no
    system_prompt_leak entry; a bad templates file is a one-line error and exit 2."""
    rule = moderator.policy.leak
    if rule is None:
        logging.getLogger(__name__).warning("policy has no system_prompt_leak entry: answers are not "
                                            "checked for the hidden instructions")
        return None
    try:
        templates = load_templates(cfg.templates_file)
        return LeakDetector(hidden_texts((t.version, t.before, t.after) for t in templates.versions.values()),
                            rule.ngram, rule.threshold, rule.min_ngrams)
    except (TemplateError, ValueError) as exc:
        _fail(f"MODERATION_TEMPLATES_FILE: {' '.join(str(exc).split())}")  # YAML errors span lines
    return None


async def build() -> grpc_server.ServiceApp:
    boot = runtime.bootstrap("moderation", DEFAULTS)
    cfg = config.load_or_exit(ModerationConfig)
    if cfg.chunk_max_chars < cfg.chunk_min_chars:
        _fail("configuration error: MODERATION_CHUNK_MAX_CHARS must be >= MODERATION_CHUNK_MIN_CHARS")
    moderator = load_moderator(cfg)
    servicer = ModerationServicer(moderator, cfg.max_inputs, cfg.max_input_bytes)
    workers = []
    if cfg.stages:
        await boot.ensure_topics()
        if "input" in cfg.stages:
            inputs = InputStage(moderator)
            workers.append(kafka_loop.StageWorker(
                "moderation-input", [cfg.input_topic_in], events_pb2.TurnEvent, inputs.handle,
                boot.kafka, group_id=cfg.input_group, instance_id=boot.instance, prepare=inputs.prepare))
        if "output" in cfg.stages:
            output = OutputStage(moderator, cfg.chunk_min_chars, cfg.chunk_max_chars,
                                first_chars=cfg.chunk_first_chars, leak=load_leak_detector(cfg, moderator))
            workers.append(kafka_loop.StageWorker(
                "moderation-output", [topics.GENERATION_PROGRESS.name], events_pb2.GenerationProgress,
                output.handle, boot.kafka, group_id=cfg.output_group, instance_id=boot.instance))
    svc = grpc_server.Service("colloquy.v1.ModerationService",
                              moderation_pb2_grpc.add_ModerationServiceServicer_to_server, servicer)
    return grpc_server.ServiceApp("moderation", boot.server, [svc], workers=workers, on_stop=[servicer.close])


if __name__ == "__main__":
    grpc_server.run(build)
