"""python -m services.generation: local Ray + Ray Serve (serve_config.yaml) + the Kafka worker.

Serve's gRPC proxy answers GenerationService on GENERATION_GRPC_PORT (default: the config file's
9000); this process serves the worker's /metrics on METRICS_PORT (9105) and each replica its own
(GENERATION_REPLICA_METRICS_PORT, 9110 and up). On SIGTERM/SIGINT the worker stops taking prompts
and lets in-flight answers finish (SHUTDOWN_GRACE_SECONDS), commits, and Serve drains its replicas
before Ray stops. With RAY_ADDRESS set it deploys onto that cluster instead of starting one.
"""

from __future__ import annotations

import time

from services.common import config, metrics, runtime, topics
from services.generation import model_ref, serving
from services.generation.config import DEFAULTS, EngineSettings, ServiceSettings, WorkerSettings


def main() -> int:
    boot = runtime.bootstrap("generation", DEFAULTS)
    svc = config.load_or_exit(ServiceSettings)
    # The replicas get theirs from deployment.build, from this same environment; loaded here too so
    # a bad value stops the service before Ray starts, and for the worker's request limits.
    eng = config.load_or_exit(EngineSettings)
    wcfg = config.load_or_exit(WorkerSettings)
    try:  # fail before starting Ray when there is no model to serve
        path, version = model_ref.resolve(eng.model_dir, eng.model_version)
    except config.ConfigError as exc:
        config.exit_config_error(exc)
    started = time.monotonic()
    serving.init_ray(svc.ray_address, svc.ray_num_cpus, svc.ray_object_store_mb)
    stop = runtime.stop_on_signals()  # after ray.init, which installs its own handlers
    state = None if (eng.model_dir or eng.model_version) else _registry_state()
    overrides = {"user_config": state.user_config()} if state is not None else None
    serve_cfg = serving.load_config(svc.serve_config, grpc_port=svc.grpc_port, deployment_overrides=overrides,
                                    capacity=_capacity(svc))
    if svc.deploy:
        serving.deploy(serve_cfg)
    else:
        serving.wait_running([a.name for a in serve_cfg.applications], timeout_s=600)
    metrics_port = metrics.serve_metrics(boot.server.metrics_port, boot.server.host)
    workers: list[runtime.ThreadWorker] = []
    if svc.kafka_worker:
        from ray import serve

        from services.generation.worker import GenerationWorker

        runtime.ensure_topics(boot.kafka, [  # renamed topics (canaries, tests) keep their kind's settings
            topics.renamed(topics.CHAT_PROMPTS, wcfg.topic_in), topics.renamed(topics.CHAT_CANCELS, wcfg.topic_cancels),
            topics.renamed(topics.GENERATION_PROGRESS, wcfg.topic_out)])
        handle = serve.get_deployment_handle(svc.deployment_name, svc.app_name)
        worker = GenerationWorker(boot.kafka, wcfg, handle, eng, boot.instance)
        worker.grace_s = boot.server.grace_seconds
        workers.append(worker)
        if state is not None:
            workers.append(_updates_worker(boot.kafka, svc, state, boot.instance))
    code = runtime.run_workers(workers, stop, boot.log, {
        "grpc_port": serve_cfg.grpc_options.port, "metrics_port": metrics_port, "model_version": version,
        "model_dir": str(path), "kafka_worker": bool(workers), "startup_s": round(time.monotonic() - started, 1)},
        stop_timeout=boot.server.grace_seconds + 15)
    if svc.deploy and not svc.ray_address:  # our own local Ray: drain the replicas and stop it
        serving.shutdown_ray()
    boot.log.info("stopped")
    return code


def _capacity(svc: ServiceSettings) -> dict[str, float] | None:
    """Our own local Ray's CPUs/GPUs, which bound the replicas asked for; None on a cluster
    (KubeRay's autoscaler adds nodes, and the overlays size replicas to them)."""
    return serving.local_capacity() if svc.deploy and not svc.ray_address else None


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
                                  deployment_overrides={"user_config": new.user_config()}, capacity=_capacity(svc))
        serving.redeploy(cfg)

    handler = updates.make_handler(apply, state, Registry().exists)
    return kafka_loop.StageWorker("generation-updates", [topics.MODEL_UPDATES.name], events_pb2.ModelUpdate,
                                  handler, kafka, instance_id=instance)


if __name__ == "__main__":
    raise SystemExit(main())
