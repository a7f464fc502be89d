"""TokenizerService over real gRPC, served by `python -m services.tokenizer` as a subprocess."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.procs import Proc, free_port
from services.tokenizer.domain import TextTokenizer


@pytest.fixture(scope="module")
def stub(tokenizer_path: Path) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    port = free_port()
    proc = Proc("services.tokenizer", {"GRPC_PORT": str(port), "METRICS_PORT": "0", "KAFKA_WORKER": "false",
                                       "TOKENIZER_PATH": str(tokenizer_path)})
    proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="colloquy.v1.TokenizerService"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def msg(role: int, content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content)


def test_tokenize_detokenize_count(stub: tokenizer_pb2_grpc.TokenizerServiceStub, tok: TextTokenizer) -> None:
    texts = ["Hello world", "My dog is called Biscuit.", "ünïcödé 🐕"]
    resp = stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts), timeout=10)
    ids = [list(t.ids) for t in resp.tokens]
    assert ids == [tok.encode(t) for t in texts]
    counts = stub.CountTokens(tokenizer_pb2.CountTokensRequest(texts=texts), timeout=10).counts
    assert list(counts) == [len(i) for i in ids]
    back = stub.Detokenize(tokenizer_pb2.DetokenizeRequest(
        tokens=[tokenizer_pb2.TokenIds(ids=i) for i in ids]), timeout=10)
    assert list(back.texts) == texts


def test_apply_chat_template(stub: tokenizer_pb2_grpc.TokenizerServiceStub, tok: TextTokenizer) -> None:
    resp = stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(
        messages=[msg(common_pb2.ROLE_SYSTEM, "Be brief."), msg(common_pb2.ROLE_USER, "Hi!")],
        add_generation_prompt=True), timeout=10)
    assert resp.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert list(resp.token_ids) == tok.encode(resp.prompt)
    text = stub.Detokenize(tokenizer_pb2.DetokenizeRequest(
        tokens=[tokenizer_pb2.TokenIds(ids=resp.token_ids)], skip_special_tokens=True), timeout=10).texts[0]
    assert "<|im_start|>" not in text and "Be brief." in text


BIG = "a" * (64 * 1024 + 1)


@pytest.mark.parametrize(("method", "request_", "message"), [
    ("Tokenize", tokenizer_pb2.TokenizeRequest(), "texts: must not be empty"),
    ("Tokenize", tokenizer_pb2.TokenizeRequest(texts=["x"] * 65), "texts: at most 64 texts per request"),
    ("Tokenize", tokenizer_pb2.TokenizeRequest(texts=["a", "b", "c", BIG]), "texts[3]: longer than 65536 bytes"),
    ("CountTokens", tokenizer_pb2.CountTokensRequest(texts=["ok", BIG]), "texts[1]: longer than 65536 bytes"),
    ("CountTokens", tokenizer_pb2.CountTokensRequest(), "texts: must not be empty"),
    ("Detokenize", tokenizer_pb2.DetokenizeRequest(), "tokens: must not be empty"),
    ("Detokenize", tokenizer_pb2.DetokenizeRequest(tokens=[tokenizer_pb2.TokenIds(ids=[1, 2]),
                                                           tokenizer_pb2.TokenIds(ids=[5, 4_000_000_000])]),
     "tokens[1].ids[1]: 4000000000 is not in the vocabulary (ids 0..49151)"),
    ("Detokenize", tokenizer_pb2.DetokenizeRequest(tokens=[tokenizer_pb2.TokenIds(ids=[1] * 32769)]),
     "tokens[0].ids: at most 32768 ids"),
    ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(), "messages: must not be empty"),
    ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(
        messages=[msg(common_pb2.ROLE_USER, "a"), msg(common_pb2.ROLE_UNSPECIFIED, "b")]),
     "messages[1].role: must be set"),
    ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(messages=[msg(9, "b")]),
     "messages[0].role: unknown role 9"),
    ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(
        messages=[msg(common_pb2.ROLE_USER, "a")] * 257), "messages: at most 256 messages"),
    ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(
        messages=[msg(common_pb2.ROLE_USER, BIG)]), "messages[0].content: longer than 65536 bytes"),
])
def test_invalid_argument_names_the_field(stub: tokenizer_pb2_grpc.TokenizerServiceStub, method: str,
                                          request_: object, message: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        getattr(stub, method)(request_, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(message), exc.value.details()


def test_missing_tokenizer_stops_startup_naming_the_variable(tmp_path: Path) -> None:
    proc = Proc("services.tokenizer", {"GRPC_PORT": "0", "KAFKA_WORKER": "false",
                                       "TOKENIZER_PATH": str(tmp_path)})
    assert proc.wait(60) == 2
    out = proc.output()
    assert f"TOKENIZER_PATH='{tmp_path}' has no tokenizer.json" in out
    assert '"msg": "serving"' not in out
