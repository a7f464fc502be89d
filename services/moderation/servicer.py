"""ModerationService over gRPC: validate the batch, score it off the event loop, answer.

Errors name the field: INVALID_ARGUMENT "inputs[2]: empty". Scoring runs in a small thread pool
(ONNX Runtime releases the GIL), so health checks and other calls stay responsive meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import grpc
from colloquy.v1 import moderation_pb2, moderation_pb2_grpc

from services.moderation import metrics
from services.moderation.domain import Moderator
from services.moderation.embedder import TextTooLong

log = logging.getLogger(__name__)


def validate(request: moderation_pb2.ModerateRequest, max_inputs: int, max_bytes: int) -> str | None:
    """The first problem with the request, naming the field, or None."""
    n = len(request.inputs)
    if n == 0:
        return "inputs: at least one text is required"
    if n > max_inputs:
        return f"inputs: {n} texts, at most {max_inputs} per request"
    for i, text in enumerate(request.inputs):
        if not text:
            return f"inputs[{i}]: empty"
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            return f"inputs[{i}]: {size} bytes of UTF-8, at most {max_bytes}"
    if request.contexts and len(request.contexts) != n:
        return (f"contexts: {len(request.contexts)} given for {n} inputs; "
                "send none, or one per input (empty for none)")
    for i, text in enumerate(request.contexts):
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            return f"contexts[{i}]: {size} bytes of UTF-8, at most {max_bytes}"
    return None


class ModerationServicer(moderation_pb2_grpc.ModerationServiceServicer):
    def __init__(self, moderator: Moderator, max_inputs: int = 32, max_bytes: int = 32 * 1024,
                 workers: int = 2) -> None:
        self.moderator = moderator
        self.max_inputs = max_inputs
        self.max_bytes = max_bytes
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="moderate")

    async def Moderate(self, request: moderation_pb2.ModerateRequest,
                       context: grpc.aio.ServicerContext) -> moderation_pb2.ModerateResponse:
        problem = validate(request, self.max_inputs, self.max_bytes)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        inputs, contexts = list(request.inputs), list(request.contexts) or None
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.pool, self.moderator.moderate, inputs, contexts)
        except TextTooLong as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("moderation failed")
            await context.abort(grpc.StatusCode.INTERNAL, "moderation failed; see the service logs")
        metrics.observe("api", time.perf_counter() - started, len(inputs), results)
        return moderation_pb2.ModerateResponse(results=results, model=self.moderator.model_id)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
