"""The generation engine as a Ray Serve deployment.

Two entrances to one engine per replica:
- `Generate`: Serve's gRPC proxy (port 9000) routes `colloquy.v1.GenerationService/Generate` here;
  Serve calls the method named like the RPC with the request proto and `grpc_context`, and
  streams what this async generator yields. Status codes go through `grpc_context` (set, then
  raise: Serve keeps a user-set code when the call fails, and a stream that yields nothing would
  otherwise end OK).
- `stream`: the Kafka worker's DeploymentHandle call. It yields a status dict first, then lists of
  `engine.Delta`, so errors arrive as data instead of wrapped Ray exceptions.

Conversation affinity: the deployment routes with `router.ConversationAffinityRouter`
(serve_config.yaml), which sends every call of one conversation (the handle's or the gRPC
metadata's `session_id`) to the replica that wins its rendezvous hash over the live replicas, and to
the least loaded other one only while that replica is at `max_ongoing_requests` or gone. The worker
sets `session_id` to the conversation id on its handle; gRPC clients send metadata
`session_id: <conversation id>`. A conversation's turns thus land where its earlier turns' KV is in
the prefix cache. `stream`'s status dict and `status()` name the replica that answered.

Client cancels through the gRPC ingress: Ray 2.60's proxy does not reliably pass a client's cancel
on to the replica (measured on the tiny model: 6 of 10 cancels reached it; 10 of 10 through a
handle), so an abandoned direct call may run to its max_tokens. The Kafka path cancels through the
handle. Pacing (GENERATION_STREAM_INTERVAL_MS, lengthened under load by
GENERATION_STREAM_MESSAGES_PER_S: tokens coalesced into fewer messages) cuts the Ray objects, and
the proxy's and client's work, per token.

Settings (services/generation/config.py says why this way): `build` loads `EngineSettings` from the
`GENERATION_*` environment once per deploy and binds it as every replica's init argument; replicas
never read the environment, and `status()` reports what a replica was built with.

Model swap: `reconfigure(user_config)` (Serve calls it on every replica when the config's
`user_config` changes) loads `model_dir`/`model_version` and an optional canary version with its
share of conversations (services/generation/rollout.py); in-flight requests finish on the old model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from colloquy.v1 import generation_pb2
from grpc_health.v1 import health_pb2
from ray import serve

from services.common import config
from services.generation import api, engine, ingress, model_ref
from services.generation.config import EngineSettings

log = logging.getLogger(__name__)

STATUS_OK = "OK"


def _start_metrics(base_port: int, host: str = "0.0.0.0", tries: int = 32) -> int:
    """Serve /metrics on the first free port from `base_port` (replicas may share a node)."""
    if base_port <= 0:
        return 0
    from prometheus_client import start_http_server

    for port in range(base_port, base_port + tries):
        try:
            start_http_server(port, addr=host)
            return port
        except OSError:
            continue
    log.warning("no free metrics port", extra={"from_port": base_port, "tries": tries})
    return 0


def _with_replica_threads(settings: EngineSettings) -> EngineSettings:
    """ONNX Runtime's default is one intra-op thread per core of the machine, whatever the replica
    reserved: replicas sharing a node (or a pod under a CPU limit) would oversubscribe the cores.
    Unless `threads` is set, a replica runs as many threads as the CPUs Ray assigned it."""
    if settings.threads:
        return settings
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return dataclasses.replace(settings, threads=math.ceil(cpus)) if cpus > 0 else settings


@serve.deployment(name="generation")
class Generation:
    """One replica: an AsyncEngine over the served model version."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings  # from `build`: the same object for every replica of the deployment
        path, version = model_ref.resolve(settings.model_dir, settings.model_version)
        self.engine = engine.AsyncEngine(path, version, _with_replica_threads(settings))
        self.metrics_port = _start_metrics(settings.replica_metrics_port)
        log.info("generation replica ready", extra={
            "model_version": version, "provider": self.engine.provider, "metrics_port": self.metrics_port,
            "host": socket.gethostname()})

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a rollout ({model_dir | model_version, canary_version, canary_percent}).

        Serve calls this on every replica (and on every new one) when the application's
        user_config changes: a model.updates event becomes a config change, not a restart.
        Requests in flight finish on the model they started with.
        """
        model_dir = str(user_config.get("model_dir") or "")
        version = str(user_config.get("model_version") or "")
        # A version already loaded is not resolved again (no second checksum pass over the files).
        if model_dir or (version and version != self.engine.model_version):
            path, label = model_ref.resolve(model_dir, version)
            await self.engine.load_version(path, label)
        canary = str(user_config.get("canary_version") or "")
        percent = int(user_config.get("canary_percent") or 0)
        if canary and percent > 0:
            loaded = self.engine.stats()["canary_version"] == canary
            path, label = (None, canary) if loaded else model_ref.resolve("", canary)
            await self.engine.set_canary(path, label, percent)
        else:
            await self.engine.set_canary(None, "", 0)

    # -- gRPC ingress -------------------------------------------------------------------------
    async def Generate(  # Serve routes the RPC to the method of the same name
        self, request: generation_pb2.GenerateRequest, grpc_context: Any = None,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Stream the candidates' deltas; every message carries the model version."""
        try:
            if isinstance(request, ingress.Undecodable):
                raise api.InvalidArgument(f"the Generate request could not be parsed: {request.error}")
            req = api.generate_request(request, max_tokens_limit=self.settings.max_tokens_limit,
                                       max_n=self.settings.max_n)
            stream = self.engine.submit(req)
        except Exception as exc:
            code, message = _status(exc)
            if grpc_context is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(message)
            raise
        _pace(stream, self.settings)
        async for deltas in stream:
            for msg in api.responses(deltas):
                yield msg

    async def Check(  # grpc.health.v1.Health/Check through the same proxy
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None,
    ) -> health_pb2.HealthCheckResponse:
        ok = self.engine.loop_error is None
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- handle API (Kafka worker, other deployments) -------------------------------------------
    async def stream(self, request: engine.Request) -> AsyncIterator[Any]:
        """First a status dict {code, message, prompt_tokens, model_version, replica}, then lists of Deltas."""
        try:
            stream = self.engine.submit(request)
        except Exception as exc:
            code, message = _status(exc)
            yield {"code": code.name, "message": message, "prompt_tokens": 0,
                   "model_version": self.engine.model_version}
            return
        _pace(stream, self.settings)
        yield {"code": STATUS_OK, "message": "", "prompt_tokens": stream.prompt_tokens,
               "model_version": stream.model_version, "replica": _replica_id()}
        async for deltas in stream:
            yield deltas

    def status(self) -> dict[str, Any]:
        """The engine's load and served versions, the settings this replica was built with, and which
        replica it is (Serve's replica id; the Ray actor's name, for `ray.get_actor`)."""
        return {**self.engine.stats(), "metrics_port": self.metrics_port, "replica": _replica_id(),
                "actor_name": ray.get_runtime_context().get_actor_name(),
                "settings": dataclasses.asdict(self.settings), "threads": self.engine.config.threads}

    def check_health(self) -> None:
        """Serve restarts a replica whose scheduler thread died."""
        if self.engine.loop_error is not None:
            raise RuntimeError(f"generation scheduler died: {self.engine.loop_error!r}")

    def __del__(self) -> None:
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng._closed = True


def _pace(stream: engine.Stream, settings: EngineSettings) -> None:
    """The stream's pacing: its interval, growing with the replica's load (engine.pace)."""
    stream.min_interval_s = settings.stream_interval_ms / 1000
    stream.messages_per_s = settings.stream_messages_per_s
    stream.opening_messages = settings.stream_opening_messages


def _replica_id() -> str:
    """Serve's id of this replica (what the request router ranks)."""
    return serve.get_replica_context().replica_id.unique_id


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an error raised before a request starts."""
    if isinstance(exc, api.InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, engine.InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, engine.Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, engine.DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, engine.EngineClosed):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.error("generation failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}"


def settings_for(args: dict[str, Any], environ: dict[str, str] | None = None) -> EngineSettings:
    """The settings every replica is built with: the `GENERATION_*` variables, read here once.

    The application takes no `args`: a second way in would let a knob differ by how it was set.
    """
    if args:
        raise config.ConfigError(
            f"the generation application takes no args (got {sorted(args)}): engine settings come from the "
            "GENERATION_* variables (docs/configuration.md), the served version from user_config")
    return config.load(EngineSettings, environ)


def build(args: dict[str, Any]) -> Any:
    """Serve application builder (`import_path: services.generation.deployment:build`).

    Serve runs it once per deploy of the application (our `serving.deploy`, or KubeRay applying
    serveConfigV2) in a task that has the node's environment, and stores the bound settings as the
    deployment's init argument: each replica, and each one added or restarted later, gets them.
    """
    return Generation.bind(settings_for(args))
