"""gRPC server bootstrap shared by every service.

Serves the service's own APIs plus `grpc.health.v1.Health` and server reflection (so grpcurl
works without proto files), exposes Prometheus `/metrics`, records per-method metrics, and on
SIGTERM/SIGINT: marks itself NOT_SERVING, stops accepting, drains in-flight calls for up to
`SHUTDOWN_GRACE_SECONDS`, stops its Kafka workers (which commit what they finished) and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics, tls
from services.common.config import ServerConfig
from services.common.log import request_id_var
from services.common.runtime import ThreadWorker, first_dead

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Service:
    """One gRPC service to serve: its generated `add_*_to_server` function and servicer."""

    name: str  # full name, e.g. "colloquy.v1.TokenizerService"
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. a string field with bad UTF-8)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpcio answers a parse failure with UNKNOWN; we want INVALID_ARGUMENT and a clear message."""
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _Undecodable(str(exc))

    return parse


async def _reject_undecodable(request: Any, ctx: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(request, _Undecodable):
        await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the {method} request could not be parsed: {request.error}")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by method and status code, times them, and binds the request id to logs."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        rid = _metadata(details.invocation_metadata, "x-request-id") or uuid.uuid4().hex
        svc = self.service

        def _done(start: float, ctx: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
            code = _code_name(ctx, exc)
            metrics.GRPC_REQUESTS.labels(svc, method, code).inc()
            metrics.GRPC_LATENCY.labels(svc, method).observe(time.perf_counter() - start)
            metrics.GRPC_IN_FLIGHT.labels(svc).dec()

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, ctx):  # type: ignore[no-untyped-def]
                start, token = _begin(svc, rid)
                exc: BaseException | None = None
                try:
                    await _reject_undecodable(request, ctx, method)
                    return await inner_uu(request, ctx)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    request_id_var.reset(token)
                    _done(start, ctx, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request, ctx):  # type: ignore[no-untyped-def]
                start, token = _begin(svc, rid)
                exc: BaseException | None = None
                try:
                    await _reject_undecodable(request, ctx, method)
                    result = inner_us(request, ctx)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:
                        await result
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    request_id_var.reset(token)
                    _done(start, ctx, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler


def _begin(svc: str, rid: str) -> tuple[float, Any]:
    metrics.GRPC_IN_FLIGHT.labels(svc).inc()
    return time.perf_counter(), request_id_var.set(rid)


def _metadata(md: Any, key: str) -> str:
    for k, v in md or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def _code_name(ctx: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    try:
        code = ctx.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == code)).name
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class ServiceApp:
    """A running service: gRPC server, health, reflection, metrics and background workers."""

    def __init__(self, name: str, cfg: ServerConfig, services: list[Service],
                 workers: list[ThreadWorker] | None = None,
                 on_stop: list[Callable[[], Awaitable[None] | None]] | None = None,
                 max_receive_bytes: int | None = None,
                 readiness: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.cfg = cfg
        # A public front sets this to its largest valid request: gRPC refuses a bigger message
        # (RESOURCE_EXHAUSTED) before any handler, key check or parse runs.
        self.max_receive_bytes = max_receive_bytes or cfg.max_message_bytes
        self.services = services
        self.workers = workers or []
        self.on_stop = on_stop or []
        # Health says NOT_SERVING while this returns False (e.g. a store still catching up);
        # checked at start and then every second, on the event loop: it must not block (read a
        # flag that a worker keeps up to date). None: SERVING once started.
        self.readiness = readiness
        self._serving: bool | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        opts = [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(interceptors=[MetricsInterceptor(self.name)], options=opts)
        for svc in self.services:
            svc.add(svc.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.name for s in self.services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.cfg.host}:{self.cfg.grpc_port}"
        if self.cfg.tls_dir:
            self.port = self.server.add_secure_port(
                address, tls.server_credentials(self.cfg.tls_dir, self.cfg.tls_client_auth))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC port {self.cfg.host}:{self.cfg.grpc_port}")
        self.metrics_port = metrics.serve_metrics(self.cfg.metrics_port, self.cfg.host)
        for w in self.workers:
            w.start()
        await self.server.start()
        await self._refresh_health()
        log.info("serving", extra={"grpc_port": self.port, "metrics_port": self.metrics_port,
                                   "services": [s.name for s in self.services]})

    async def _set_health(self, status: int) -> None:
        for name in ["", *[s.name for s in self.services]]:
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    async def _refresh_health(self) -> None:
        """SERVING when ready (always, without a readiness check), NOT_SERVING otherwise."""
        try:
            ready = self.readiness is None or bool(self.readiness())
        except Exception:
            log.exception("readiness check failed")
            ready = False
        if ready != self._serving:
            self._serving = ready
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if ready
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.readiness is not None:
                log.info("health changed", extra={"serving": ready})

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Graceful shutdown: not serving -> no new calls -> drain -> stop workers."""
        log.info("shutting down", extra={"grace_s": self.cfg.grace_seconds})
        self._serving = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.cfg.grace_seconds)
        loop = asyncio.get_running_loop()
        for w in self.workers:
            await loop.run_in_executor(None, w.stop)
        for hook in self.on_stop:
            res = hook()
            if asyncio.iscoroutine(res):
                await res
        log.info("stopped")

    async def run_until_signal(self) -> int:
        """Serve until SIGTERM/SIGINT or a worker dies; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        code = 0
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
            except TimeoutError:
                await self._refresh_health()
                dead = first_dead(self.workers)
                if dead is not None:
                    log.error("a worker died; exiting so the supervisor restarts us",
                              extra={"worker": getattr(dead, "name", type(dead).__name__)})
                    code = 1
                    break
        await self.stop()
        return code


def run(app_factory: Callable[[], Awaitable[ServiceApp]]) -> None:
    """Entry point helper: build the app inside the event loop and serve until a signal."""

    async def main() -> int:
        app = await app_factory()
        return await app.run_until_signal()

    raise SystemExit(asyncio.run(main()))
