"""A minimal service built on the shared kit, used to test the kit itself (health, reflection,
metrics, graceful drain, config errors). Its CountTokens sleeps SAMPLE_DELAY_S seconds so a
test can send SIGTERM while a call is in flight."""

from __future__ import annotations

import asyncio
import dataclasses

from colloquy.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from services.common import config, grpc_server, log


class Counter(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def CountTokens(self, request, context):
        await asyncio.sleep(self.delay)
        return tokenizer_pb2.CountTokensResponse(counts=[len(t.split()) for t in request.texts])


async def build() -> grpc_server.ServiceApp:
    server = config.load_or_exit(config.ServerConfig)
    cfg = config.load_or_exit(_Delay)
    log.setup("sample", server.log_level)
    svc = grpc_server.Service("colloquy.v1.TokenizerService",
                              tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, Counter(cfg.delay_s))
    return grpc_server.ServiceApp("sample", server, [svc])


@dataclasses.dataclass(frozen=True)
class _Delay:
    delay_s: float = config.env("SAMPLE_DELAY_S", 0.0, check=lambda v: v >= 0, hint="seconds >= 0")


if __name__ == "__main__":
    grpc_server.run(build)
