"""GenerationService on Ray Serve's gRPC proxy, with a request parser that cannot fail.

Serve keeps the request deserializer of the servicer function it is given. With the generated
one, bytes that are not a GenerateRequest make grpcio answer INTERNAL ("Exception deserializing
request!"), a server fault by its name. This registers the same method with a parser that hands
such bytes on as `Undecodable`, which `Generation.Generate` answers with INVALID_ARGUMENT, like
every other Colloquy service (services/common/grpc_server.py does the same for plain servers).
serve_config.yaml names this function in `grpc_servicer_functions`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from colloquy.v1 import generation_pb2
from google.protobuf.message import DecodeError

SERVICE = "colloquy.v1.GenerationService"


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Request bytes that did not parse (picklable: the proxy ships the request to a replica)."""

    error: str


def parse(raw: bytes) -> generation_pb2.GenerateRequest | Undecodable:
    try:
        return generation_pb2.GenerateRequest.FromString(raw)
    except (DecodeError, ValueError) as exc:
        return Undecodable(str(exc) or type(exc).__name__)


def add_GenerationServiceServicer_to_server(servicer: Any, server: Any) -> None:
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
