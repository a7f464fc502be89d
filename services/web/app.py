"""The HTTP app: OpenAI-compatible routes that call the gateway (and moderation) over gRPC.

Thin on purpose: parsing and shaping live in `domain`; the gateway authenticates the forwarded
key, limits, validates and moderates exactly as for gRPC callers. A request's gRPC call is
cancelled when its HTTP client goes away, which cancels generation in the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from colloquy.v1 import chat_pb2, chat_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from model.registry import DEFAULT_DEPLOYMENT, Registry, RegistryError
from services.common import tls
from services.common.auth import KeyRing
from services.web import domain, metrics
from services.web.config import WebConfig

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"  # the page: plain HTML/JS/CSS, no build step

Handler = Callable[[Request], Awaitable[Response]]


class Backend:
    """The gRPC clients and key ring one web process uses (channels made inside its event loop)."""

    def __init__(self, cfg: WebConfig, keys: KeyRing, registry: Registry | None = None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.registry = registry
        self.gateway_channel = tls.insecure_or_secure_channel(cfg.gateway_addr, aio=True)
        self.moderation_channel = tls.insecure_or_secure_channel(cfg.moderation_addr, aio=True)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.gateway_channel)
        self.moderation = moderation_pb2_grpc.ModerationServiceStub(self.moderation_channel)
        self.health = health_pb2_grpc.HealthStub(self.gateway_channel)

    def served_models(self) -> list[str]:
        """`colloquy` and the registry's served version(s), when the registry can be read here."""
        ids = [self.cfg.model_id]
        if self.registry is not None:
            try:
                ids += [v for v in (self.registry.current(DEFAULT_DEPLOYMENT),
                                    (self.registry.canary(DEFAULT_DEPLOYMENT) or {}).get("version")) if v]
            except (RegistryError, OSError):
                log.warning("model registry unreadable; listing only the model id", exc_info=True)
        return list(dict.fromkeys(ids))

    async def close(self) -> None:
        await self.gateway_channel.close()
        await self.moderation_channel.close()


def _metadata(request: Request) -> list[tuple[str, str]]:
    """The caller's key goes to the gateway unchanged: its users and limits apply."""
    auth = request.headers.get("authorization", "")
    return [("authorization", auth)] if auth else []


def _error_response(err: domain.ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _rpc_error(exc: grpc.aio.AioRpcError, renames: dict[str, str] | None = None,
               peer: str = "the chat gateway") -> domain.ApiError:
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.UNAVAILABLE and domain.is_transport_failure(details):
        details = f"{peer} cannot be reached right now; retry shortly"  # not grpc's socket-level text
    return domain.from_grpc(exc.code(), details, exc.trailing_metadata() or (), renames)


async def _json(request: Request, limit: int) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise domain.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise domain.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise domain.ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def _authorize(backend: Backend, request: Request) -> str:
    """The caller's user for routes that do not reach the gateway (models, moderations)."""
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    user = backend.keys.user_for(key) if key else None
    if user is None:
        raise domain.ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
    return user


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _rest(call: Any) -> AsyncIterator[chat_pb2.ChatEvent]:
    """The call's remaining events (read() throughout: grpc forbids mixing it with iteration)."""
    while (ev := await call.read()) is not grpc.aio.EOF:
        yield ev


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(call: Any, turn: domain.Turn, request: Request, route: str) -> bool:
    """Read the rest of the call into `turn`; False when the client went away first (call cancelled)."""
    async def read() -> None:
        async for ev in _rest(call):
            turn.apply(ev)

    reader = asyncio.ensure_future(read())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():
            call.cancel()
            metrics.DISCONNECTS.labels(route).inc()
            return False
        reader.result()  # raises the call's error
        return True
    finally:
        watcher.cancel()
        reader.cancel()


async def _start(backend: Backend, request: Request, req: chat_pb2.ChatRequest,
                 renames: dict[str, str], route: str, received: float) -> tuple[Any, domain.Turn]:
    """Send the turn and wait for `started`: every refusal (key, limit, bad value) comes before it,
    so it becomes an HTTP error with its status instead of a 200 stream that fails."""
    metrics.ADDED.labels(route, "request").observe(time.perf_counter() - received)
    call = backend.chat.Chat(req, metadata=_metadata(request))
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(exc, renames) from None
    if first is grpc.aio.EOF or first.WhichOneof("event") != "started":
        call.cancel()
        got = "the end of the stream" if first is grpc.aio.EOF else f"a {first.WhichOneof('event')} event"
        log.error("the gateway's first Chat event was not 'started'", extra={"got": got})
        raise domain.ApiError(502, f"the gateway answered out of order ({got} before the start event)",
                              code="bad_gateway")
    turn = domain.Turn()
    turn.apply(first)
    return call, turn


def _turn_headers(turn: domain.Turn) -> dict[str, str]:
    return {"X-Colloquy-Conversation-Id": turn.conversation_id, "X-Colloquy-Turn-Index": str(turn.turn_index)}


def _failed(turn: domain.Turn) -> domain.ApiError | None:
    bad = domain.failed_candidates(turn)
    if not bad:
        return None
    return domain.ApiError(500, f"the answer failed (candidates {bad}, request id {turn.request_id}); retry, and "
                                "report the id if it keeps happening", code="internal_error")


def build_app(backend: Backend) -> Starlette:
    cfg = backend.cfg

    def route(name: str, fn: Handler) -> Handler:
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await fn(request)
            except domain.ApiError as err:
                response = _error_response(err)
            except Exception:
                ref = uuid.uuid4().hex
                log.exception("unexpected error in a web request", extra={"route": name, "ref": ref})
                response = _error_response(domain.ApiError(
                    500, f"internal error (reference {ref}); retry, and report the reference if it keeps happening",
                    code="internal_error"))
            metrics.REQUESTS.labels(name, str(response.status_code)).inc()
            metrics.LATENCY.labels(name).observe(time.perf_counter() - started)
            return response
        return handle

    async def chat_completions(request: Request) -> Response:
        received = time.perf_counter()
        body = await _json(request, cfg.max_body_bytes)
        plan = domain.chat_plan(body, backend.served_models(), request.headers.get(domain.CONVERSATION_HEADER, ""))
        if plan.user:
            log.info("chat completion for an end user", extra={"end_user": plan.user[:64]})
        call, turn = await _start(backend, request, plan.request, plan.renames, "chat_completions", received)
        created = int(time.time())
        n = plan.request.sampling.n or 1
        if not plan.stream:
            try:
                if not await _collect(call, turn, request, "chat_completions"):
                    return Response(status_code=499)
            except grpc.aio.AioRpcError as exc:
                raise _rpc_error(exc, plan.renames) from None
            if (err := _failed(turn)) is not None:
                raise err
            return JSONResponse(domain.completion(turn, plan.model, created), headers=_turn_headers(turn))

        async def events() -> AsyncIterator[bytes]:
            first_text = True
            finished = False
            added = metrics.ADDED.labels("chat_completions", "event")
            try:
                for c in domain.chunks_for(chat_pb2.ChatEvent(started=chat_pb2.ChatStarted()), turn, plan.model,
                                           created, plan.include_usage, n):
                    yield _sse(c)
                async for ev in _rest(call):
                    read = time.perf_counter()
                    turn.apply(ev)
                    if ev.WhichOneof("event") == "done" and (err := _failed(turn)) is not None:
                        yield _sse(err.body())
                        finished = True
                        return
                    if first_text and ev.WhichOneof("event") == "delta":
                        first_text = False
                        metrics.TTFT.labels("chat_completions").observe(time.perf_counter() - received)
                    for c in domain.chunks_for(ev, turn, plan.model, created, plan.include_usage, n):
                        yield _sse(c)
                    # Resumed once the server took the last chunk: the event's whole time in this process.
                    added.observe(time.perf_counter() - read)
                finished = True
                yield b"data: [DONE]\n\n"
            except grpc.aio.AioRpcError as exc:
                finished = True
                yield _sse(_rpc_error(exc, plan.renames).body())
            finally:
                if not finished:  # the client went away (the response was cancelled)
                    metrics.DISCONNECTS.labels("chat_completions").inc()
                call.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**_turn_headers(turn), "Cache-Control": "no-cache"})

    async def responses(request: Request) -> Response:
        received = time.perf_counter()
        body = await _json(request, cfg.max_body_bytes)
        plan = domain.response_plan(body, backend.served_models())
        renames = {"max_tokens": "max_output_tokens", "messages": "input",
                   "conversation_id": "previous_response_id", **plan.renames}
        call, turn = await _start(backend, request, plan.request, renames, "responses", received)
        created = int(time.time())
        if not plan.stream:
            try:
                if not await _collect(call, turn, request, "responses"):
                    return Response(status_code=499)
            except grpc.aio.AioRpcError as exc:
                raise _rpc_error(exc, renames) from None
            if (err := _failed(turn)) is not None:
                raise err
            return JSONResponse(domain.response_object(turn, plan.model, created, plan.previous_response_id,
                                                       instructions=plan.instructions),
                                headers=_turn_headers(turn))

        async def events() -> AsyncIterator[bytes]:
            seq = 0
            finished = False
            rid = domain.response_id(turn.conversation_id, turn.turn_index)
            item = domain.message_id(rid)

            def emit(kind: str, **fields: Any) -> bytes:
                nonlocal seq
                seq += 1
                return _sse({"type": kind, "sequence_number": seq - 1, **fields}, event=kind)

            try:
                pending = domain.response_object(turn, plan.model, created, plan.previous_response_id,
                                                 instructions=plan.instructions,
                                                 status="in_progress")
                yield emit("response.created", response=pending)
                yield emit("response.in_progress", response=pending)
                yield emit("response.output_item.added", output_index=0, item={
                    "type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []})
                yield emit("response.content_part.added", item_id=item, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})
                first_text = True
                async for ev in _rest(call):
                    turn.apply(ev)
                    if ev.WhichOneof("event") == "delta" and ev.delta.index == 0:
                        if first_text:
                            first_text = False
                            metrics.TTFT.labels("responses").observe(time.perf_counter() - received)
                        yield emit("response.output_text.delta", item_id=item, output_index=0, content_index=0,
                                   delta=ev.delta.text, logprobs=[])
                if (err := _failed(turn)) is not None:
                    finished = True
                    yield emit("error", code=err.code, message=err.message, param=None)
                    return
                final = domain.response_object(turn, plan.model, created, plan.previous_response_id,
                                               instructions=plan.instructions)
                text = turn.texts.get(0, "")
                yield emit("response.output_text.done", item_id=item, output_index=0, content_index=0, text=text,
                           logprobs=[])
                yield emit("response.content_part.done", item_id=item, output_index=0, content_index=0,
                           part={"type": "output_text", "text": text, "annotations": []})
                yield emit("response.output_item.done", output_index=0, item=final["output"][0])
                finished = True
                yield emit(f"response.{final['status']}", response=final)
            except grpc.aio.AioRpcError as exc:
                finished = True
                err = _rpc_error(exc, renames)
                yield emit("error", code=err.code, message=err.message, param=err.param)
            finally:
                if not finished:
                    metrics.DISCONNECTS.labels("responses").inc()
                call.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**_turn_headers(turn), "Cache-Control": "no-cache"})

    async def moderations(request: Request) -> Response:
        _authorize(backend, request)
        texts = domain.moderation_inputs(await _json(request, cfg.max_body_bytes))
        try:
            resp = await backend.moderation.Moderate(moderation_pb2.ModerateRequest(inputs=texts),
                                                     timeout=cfg.call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = _rpc_error(exc, peer="the moderation service")
            if err.param is not None and err.param.startswith("inputs"):
                err.param = "input"
                err.message = "input" + err.message.removeprefix("inputs")
            raise err from None
        return JSONResponse(domain.moderation_response(resp, uuid.uuid4().hex))

    async def gateway(method: Any, req: Any, request: Request, renames: dict[str, str] | None = None) -> Any:
        """One unary gateway call with the caller's key; its gRPC error as OpenAI's error JSON
        (`renames`: proto field -> the HTTP parameter the client sent)."""
        try:
            return await method(req, metadata=_metadata(request), timeout=cfg.call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, renames) from None

    async def feedback(request: Request) -> Response:
        """The page's thumbs and rankings: SubmitFeedback with the caller's key."""
        req = domain.feedback_request(await _json(request, cfg.max_body_bytes))
        resp = await gateway(backend.chat.SubmitFeedback, req, request)
        return JSONResponse({"feedback_id": resp.feedback_id})

    async def list_conversations(request: Request) -> Response:
        """The page's conversation list: ListConversations with the caller's key."""
        req = domain.list_request(request.query_params)
        resp = await gateway(backend.chat.ListConversations, req, request, {"page_size": "limit"})
        return JSONResponse(domain.conversation_list(resp))

    async def get_conversation(request: Request) -> Response:
        """Opening a conversation: its turns (GetConversation with the caller's key)."""
        req = domain.conversation_request(request.path_params["conversation_id"], request.query_params)
        resp = await gateway(backend.chat.GetConversation, req, request, {"page_size": "limit"})
        return JSONResponse(domain.conversation(resp))

    async def delete_conversation(request: Request) -> Response:
        """DeleteConversation with the caller's key: the history, and the feedback given on it."""
        conv = request.path_params["conversation_id"]
        resp = await gateway(backend.chat.DeleteConversation, chat_pb2.DeleteConversationRequest(conversation_id=conv),
                             request)
        return JSONResponse({"id": conv, "object": "conversation.deleted", "deleted": True,
                             "deleted_turns": resp.deleted_turns})

    async def list_models(request: Request) -> Response:
        _authorize(backend, request)
        return JSONResponse(domain.models(backend.served_models(), int(time.time())))

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        """Ready only while the gateway says SERVING: without it no chat can be answered."""
        try:
            resp = await backend.health.Check(health_pb2.HealthCheckRequest(), timeout=min(2.0, cfg.call_timeout_s))
            ok = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        return JSONResponse({"status": "ready" if ok else "gateway not serving"}, status_code=200 if ok else 503)

    async def http_error(_request: Request, exc: Exception) -> Response:
        """Unknown paths and wrong methods answer in OpenAI's error shape too."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error_response(domain.ApiError(status, str(getattr(exc, "detail", "")) or "request failed",
                                               code="not_found" if status == 404 else None))

    return Starlette(exception_handlers={HTTPException: http_error}, routes=[
        Route("/v1/chat/completions", route("chat_completions", chat_completions), methods=["POST"]),
        Route("/v1/responses", route("responses", responses), methods=["POST"]),
        Route("/v1/moderations", route("moderations", moderations), methods=["POST"]),
        Route("/v1/models", route("models", list_models), methods=["GET"]),
        Route("/v1/feedback", route("feedback", feedback), methods=["POST"]),
        Route("/v1/conversations", route("conversations", list_conversations), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", route("conversation", get_conversation), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", route("conversation_delete", delete_conversation),
              methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/", lambda _request: FileResponse(STATIC / "index.html"), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
