"""python -m services.generation: local Ray + Ray Serve (serve_config.yaml) + the Kafka worker.

Serve's gRPC proxy answers GenerationService on GENERATION_GRPC_PORT (default: the config file's
9000); this process serves the worker's /metrics on METRICS_PORT (9105) and each replica its own
(GENERATION_REPLICA_METRICS_PORT, 9110 and up). On SIGTERM/SIGINT the worker stops taking prompts
and lets in-flight answers finish (SHUTDOWN_GRACE_SECONDS), commits, and Serve drains its replicas
before Ray stops. With RAY_ADDRESS set it deploys onto that cluster instead of starting one.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import threading
import time

from services.common import config, log, metrics, topics
from services.generation import model_ref, serving
from services.generation.config import DEFAULTS, EngineSettings, ServiceSettings, WorkerSettings


def main() -> int:
    server = config.load_or_exit(config.ServerConfig, defaults=DEFAULTS)
    svc = config.load_or_exit(ServiceSettings)
    eng = config.load_or_exit(EngineSettings)
    wcfg = config.load_or_exit(WorkerSettings)
    kafka = config.load_or_exit(config.KafkaConfig) if svc.kafka_worker else None
    logger = log.setup("generation", server.log_level)
    try:  # fail before starting Ray when there is no model to serve
        path, version = model_ref.resolve(eng.model_dir, eng.model_version)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return 2
    started = time.monotonic()
    serving.init_ray(svc.ray_address, svc.ray_num_cpus, svc.ray_object_store_mb)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    state = None if (eng.model_dir or eng.model_version) else _registry_state()
    overrides = {"user_config": state.user_config()} if state is not None else None
    serve_cfg = serving.load_config(svc.serve_config, grpc_port=svc.grpc_port, deployment_overrides=overrides)
    if svc.deploy:
        serving.deploy(serve_cfg)
    else:
        serving.wait_running([a.name for a in serve_cfg.applications], timeout_s=600)
    metrics_port = metrics.serve_metrics(server.metrics_port, server.host)
    worker = None
    if kafka is not None:
        from ray import serve

        from services.generation.worker import GenerationWorker

        if kafka.create_topics:  # renamed topics (canaries, tests) keep their kind's settings
            topics.ensure_topics(kafka.bootstrap_servers, [
                dataclasses.replace(kind, name=name) for kind, name in (
                    (topics.CHAT_PROMPTS, wcfg.topic_in), (topics.CHAT_CANCELS, wcfg.topic_cancels),
                    (topics.GENERATION_PROGRESS, wcfg.topic_out),
                    (topics.CHAT_UNANSWERED, topics.CHAT_UNANSWERED.name))], kafka=kafka)
        handle = serve.get_deployment_handle(svc.deployment_name, svc.app_name)
        worker = GenerationWorker(kafka, wcfg, handle, eng, server.instance_id or socket.gethostname())
        worker.grace_s = server.grace_seconds
        worker.start()
        if state is not None:
            updates = _updates_worker(kafka, svc, state, server.instance_id or socket.gethostname())
            updates.start()
    logger.info("serving", extra={"grpc_port": serve_cfg.grpc_options.port, "metrics_port": metrics_port,
                                  "model_version": version, "model_dir": str(path),
                                  "kafka_worker": worker is not None,
                                  "startup_s": round(time.monotonic() - started, 1)})
    code = 0
    while not stop.wait(1.0):
        if worker is not None and worker.error is not None:
            logger.error("the Kafka worker died; exiting so the supervisor restarts us")
            code = 1
            break
    logger.info("shutting down", extra={"grace_s": server.grace_seconds})
    if worker is not None:
        worker.stop(timeout=server.grace_seconds + 15)
    import ray
    from ray import serve

    if svc.deploy and not svc.ray_address:  # our own local Ray: drain the replicas and stop it
        serve.shutdown()
        ray.shutdown()
    logger.info("stopped")
    return code


def _registry_state():  # type: ignore[no-untyped-def]
    from model.registry import Registry
    from services.generation.updates import registry_state

    return registry_state(Registry())


def _updates_worker(kafka: config.KafkaConfig, svc: ServiceSettings, state, instance: str):  # type: ignore[no-untyped-def]
    """Applies `model.updates` events to the running application (a Serve user_config change)."""
    from colloquy.v1 import events_pb2

    from model.registry import Registry
    from services.common import kafka_loop
    from services.generation import updates

    def apply(new) -> None:  # type: ignore[no-untyped-def]
        cfg = serving.load_config(svc.serve_config, grpc_port=svc.grpc_port,
                                  deployment_overrides={"user_config": new.user_config()})
        serving.redeploy(cfg)

    if kafka.create_topics:
        topics.ensure_topics(kafka.bootstrap_servers, [topics.MODEL_UPDATES], kafka=kafka)
    handler = updates.make_handler(apply, state, Registry().exists)
    return kafka_loop.StageWorker("generation-updates", [topics.MODEL_UPDATES.name], events_pb2.ModelUpdate,
                                  handler, kafka, instance_id=instance)


if __name__ == "__main__":
    raise SystemExit(main())
