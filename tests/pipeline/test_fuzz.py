"""Hostile input against every public RPC of the running stack (hypothesis).

Random and extreme messages (built from each request's protobuf descriptor) and raw random bytes:
no call may end INTERNAL or UNKNOWN, no server may die, memory stays bounded, and a message over
the gRPC size limit is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
import pytest
from colloquy.v1 import chat_pb2, generation_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.fuzz import RPCS, call, messages
from devtools.stack import Stack

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]


@pytest.mark.parametrize(("service", "method", "req", "resp", "streaming"), RPCS,
                         ids=[m.rsplit("/", 1)[1] for _, m, *_ in RPCS])
def test_random_messages_and_bytes_never_crash_or_fail_internally(
        stack: Stack, service: str, method: str, req: type, resp: type, streaming: bool) -> None:
    before = stack.rss_mb()
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(payload=st.one_of(messages(req.DESCRIPTOR), st.binary(max_size=512)))
    def fuzz(payload: bytes) -> None:
        if streaming and method.endswith("/Chat"):
            # Keep generation cheap: a valid random chat answers with at most 2 tokens.
            msg = chat_pb2.ChatRequest()
            try:
                msg.ParseFromString(payload)
                if not msg.sampling.HasField("max_tokens") or msg.sampling.max_tokens > 2 or msg.sampling.n > 2:
                    msg.sampling.max_tokens, msg.sampling.n = 2, 1
                    payload = msg.SerializeToString()
            except Exception:
                pass  # raw bytes that do not parse: sent as they are
        if method.endswith("/Generate"):
            msg = generation_pb2.GenerateRequest()
            try:
                msg.ParseFromString(payload)
                if msg.sampling.max_tokens > 2 or msg.sampling.n > 2:
                    msg.sampling.max_tokens, msg.sampling.n = 2, 1
                    payload = msg.SerializeToString()
            except Exception:
                pass
        seen.add(call(stack, service, method, streaming, payload))

    fuzz()
    for name, proc in stack.procs.items():
        assert proc.popen.poll() is None, f"{name} died"
    after = stack.rss_mb()
    assert after[service] - before[service] < 150, (before, after)  # bounded, not a leak per call
    assert grpc.StatusCode.INVALID_ARGUMENT in seen or grpc.StatusCode.UNAUTHENTICATED in seen \
        or grpc.StatusCode.NOT_FOUND in seen, seen


@pytest.mark.parametrize("service", ["gateway", "tokenizer", "moderation", "prompt"])
def test_a_message_over_the_size_limit_is_refused_clearly(stack: Stack, service: str) -> None:
    method = {"gateway": "/colloquy.v1.ChatService/GetConversation",
              "tokenizer": "/colloquy.v1.TokenizerService/CountTokens",
              "moderation": "/colloquy.v1.ModerationService/Moderate",
              "prompt": "/colloquy.v1.PromptService/AssemblePrompt"}[service]
    huge = b"\x0a" + b"\x80\x80\x80\x03" + b"x" * (6 * 1024 * 1024)  # field 1, 6 MiB (limit: 4 MiB)
    code = call(stack, service, method, False, huge)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
