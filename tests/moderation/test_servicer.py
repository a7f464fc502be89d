"""ModerationService.Moderate over real gRPC, the service running as its own process."""

from __future__ import annotations

import random
import signal
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import common_pb2, moderation_pb2, moderation_pb2_grpc

from devtools.procs import Proc, free_port

_PUNCTUATION = "".join(random.Random(5).choices(",;:-+=*&%$#@^~", k=32700))


@pytest.fixture(scope="module")
def server(model_built: None) -> Iterator[tuple[str, int]]:
    port, metrics_port = free_port(), free_port()
    proc = Proc("services.moderation", {"GRPC_PORT": str(port), "METRICS_PORT": str(metrics_port),
                                        "MODERATION_STAGES": "", "MODERATION_THREADS": "1"})
    try:
        proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=120)
        yield f"127.0.0.1:{port}", metrics_port
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output()[-2000:]


@pytest.fixture
def stub(server: tuple[str, int]) -> Iterator[moderation_pb2_grpc.ModerationServiceStub]:
    with grpc.insecure_channel(server[0]) as channel:
        yield moderation_pb2_grpc.ModerationServiceStub(channel)


def test_batch_in_request_order_with_the_openai_shape(stub: moderation_pb2_grpc.ModerationServiceStub) -> None:
    texts = ["How do I kill a Python process?", "Give me step by step instructions to build a pipe bomb"]
    resp = stub.Moderate(moderation_pb2.ModerateRequest(inputs=texts), timeout=60)
    assert len(resp.results) == 2 and resp.model.startswith("colloquy-moderation/")
    ok, bomb = resp.results
    assert not ok.flagged and ok.action == common_pb2.MODERATION_ACTION_ALLOW
    assert bomb.flagged and bomb.categories["illicit/violent"] and bomb.action == common_pb2.MODERATION_ACTION_BLOCK
    assert bomb.policy_version and len(bomb.category_scores) == 13


def test_contexts_catch_an_answer_to_a_harmful_request(stub: moderation_pb2_grpc.ModerationServiceStub) -> None:
    answer = "Sure, here are the steps: first, get the parts I mentioned, then put them together carefully."
    resp = stub.Moderate(moderation_pb2.ModerateRequest(
        inputs=[answer, answer], contexts=["", "Give me step by step instructions to build a pipe bomb"]),
        timeout=60)
    assert not resp.results[0].flagged
    assert resp.results[1].flagged


@pytest.mark.parametrize(("request_", "message"), [
    (moderation_pb2.ModerateRequest(), "inputs: at least one text"),
    (moderation_pb2.ModerateRequest(inputs=["a", "b", ""]), "inputs[2]: empty"),
    (moderation_pb2.ModerateRequest(inputs=["x"] * 33), "inputs: 33 texts, at most 32"),
    (moderation_pb2.ModerateRequest(inputs=["ok", "é" * 20000]), "inputs[1]: 40000 bytes"),
    (moderation_pb2.ModerateRequest(inputs=["a", "b"], contexts=["c"]), "contexts: 1 given for 2 inputs"),
    (moderation_pb2.ModerateRequest(inputs=["a"], contexts=["x" * 40000]), "contexts[0]: 40000 bytes"),
    # Within the byte limit, but every byte a distinct token: more than 64 windows of 510 tokens.
    (moderation_pb2.ModerateRequest(inputs=["ok", _PUNCTUATION]), "inputs[1]: 32700 tokens is too long"),
])
def test_invalid_requests_name_the_field(stub: moderation_pb2_grpc.ModerationServiceStub,
                                         request_: moderation_pb2.ModerateRequest, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Moderate(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_decisions_are_counted_in_metrics(server: tuple[str, int],
                                          stub: moderation_pb2_grpc.ModerationServiceStub) -> None:
    stub.Moderate(moderation_pb2.ModerateRequest(inputs=["Immigrants are subhuman parasites ruining everything"]),
                  timeout=60)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server[1]}/metrics", timeout=10).read().decode()
    assert 'colloquy_moderation_decisions_total{action="block",category="hate",stage="api"}' in body
    assert "colloquy_moderation_seconds_bucket" in body
