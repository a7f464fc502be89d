"""TokenizerService over gRPC: validate -> domain -> status codes.

Tokenizing up to 64 x 64 KiB takes seconds on a small CPU, so the work runs in a thread
(`tokenizers` releases the GIL) and the event loop keeps answering health checks and other calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc
from colloquy.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from services.tokenizer.domain import ChatMessage, InvalidArgument, TextTokenizer, check_message_count

T = TypeVar("T")

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


def to_messages(messages: list[common_pb2.ChatMessage], field: str = "messages") -> list[ChatMessage]:
    """Proto messages -> domain messages; an unset or unknown role is INVALID_ARGUMENT."""
    check_message_count(len(messages), field)
    out = []
    for i, m in enumerate(messages):
        role = ROLE_NAMES.get(m.role)
        if role is None:
            what = "must be set" if m.role == common_pb2.ROLE_UNSPECIFIED else f"unknown role {m.role}"
            raise InvalidArgument(f"{field}[{i}].role", f"{what} (ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT)")
        out.append(ChatMessage(role, m.content))
    return out


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tok = tokenizer

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenizeResponse:
        ids = await self._run(context, lambda: self.tok.encode_batch(request.texts, request.add_special_tokens))
        return tokenizer_pb2.TokenizeResponse(tokens=[tokenizer_pb2.TokenIds(ids=i) for i in ids])

    async def Detokenize(self, request: tokenizer_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> tokenizer_pb2.DetokenizeResponse:
        seqs = [list(t.ids) for t in request.tokens]
        texts = await self._run(context, lambda: self.tok.decode_batch(seqs, request.skip_special_tokens))
        return tokenizer_pb2.DetokenizeResponse(texts=texts)

    async def CountTokens(self, request: tokenizer_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> tokenizer_pb2.CountTokensResponse:
        counts = await self._run(context, lambda: self.tok.count_batch(request.texts))
        return tokenizer_pb2.CountTokensResponse(counts=counts)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ApplyChatTemplateRequest,
                                context: grpc.aio.ServicerContext
                                ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        def work() -> tokenizer_pb2.ApplyChatTemplateResponse:
            rendered = self.tok.apply_chat_template(to_messages(list(request.messages)),
                                                    request.add_generation_prompt)
            return tokenizer_pb2.ApplyChatTemplateResponse(prompt=rendered.text, token_ids=rendered.ids)

        return await self._run(context, work)
