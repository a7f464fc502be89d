"""The shared gRPC bootstrap: health, reflection, metrics, graceful drain, config errors."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
from colloquy.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devtools.procs import Proc, free_port


def start_sample(delay: float = 0.0, grace: float = 20.0) -> tuple[Proc, int, int]:
    port, mport = free_port(), free_port()
    proc = Proc("tests.common.sample_server", {
        "GRPC_PORT": str(port), "METRICS_PORT": str(mport), "SAMPLE_DELAY_S": str(delay),
        "SHUTDOWN_GRACE_SECONDS": str(grace)})
    proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=30)
    return proc, port, mport


def test_health_reflection_and_metrics() -> None:
    proc, port, mport = start_sample()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            hs = health_pb2_grpc.HealthStub(ch)
            assert hs.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert hs.Check(health_pb2.HealthCheckRequest(service="colloquy.v1.TokenizerService")).status \
                == health_pb2.HealthCheckResponse.SERVING

            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(iter(refl.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]))))
            names = {s.name for s in resp.list_services_response.service}
            assert {"colloquy.v1.TokenizerService", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names

            stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
            assert list(stub.CountTokens(tokenizer_pb2.CountTokensRequest(texts=["a b c"])).counts) == [3]
            try:
                stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["x"]))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED

        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert 'colloquy_grpc_requests_total{code="OK",method="CountTokens",service="sample"} 1.0' in body
        assert 'code="UNIMPLEMENTED",method="Tokenize"' in body
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_sigterm_drains_in_flight_call() -> None:
    proc, port, _ = start_sample(delay=2.0)
    result: dict[str, object] = {}

    def call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
            try:
                result["counts"] = list(stub.CountTokens(
                    tokenizer_pb2.CountTokensRequest(texts=["one two"]), timeout=20).counts)
            except grpc.RpcError as err:
                result["error"] = err.code()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.7)  # the call is now sleeping inside the servicer
    proc.signal(signal.SIGTERM)
    t.join(30)
    code = proc.wait(30)
    assert result == {"counts": [2]}, result
    assert code == 0
    out = proc.output()
    assert out.index('"msg": "shutting down"') < out.index('"msg": "stopped"')


def test_new_calls_refused_while_draining() -> None:
    proc, port, _ = start_sample(delay=2.0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        fut = stub.CountTokens.future(tokenizer_pb2.CountTokensRequest(texts=["a"]), timeout=20)
        time.sleep(0.5)
        proc.signal(signal.SIGTERM)
        time.sleep(0.3)
        # A new connection is refused once the server stopped accepting.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch2:
            try:
                tokenizer_pb2_grpc.TokenizerServiceStub(ch2).CountTokens(
                    tokenizer_pb2.CountTokensRequest(texts=["b"]), timeout=2)
                refused = False
            except grpc.RpcError as err:
                refused = err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert list(fut.result().counts) == [1]
    assert refused
    assert proc.wait(30) == 0


def test_bad_config_value_stops_startup_naming_the_variable() -> None:
    proc = Proc("tests.common.sample_server", {"GRPC_PORT": "not-a-port"})
    assert proc.wait(30) == 2
    out = proc.output()
    assert "GRPC_PORT" in out and "not-a-port" in out
    assert '"msg": "serving"' not in out

    proc = Proc("tests.common.sample_server", {"GRPC_PORT": "70000"})
    assert proc.wait(30) == 2
    assert "GRPC_PORT=70000 is out of range" in proc.output()


def test_unparseable_request_is_invalid_argument() -> None:
    proc, port, _ = start_sample()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/colloquy.v1.TokenizerService/CountTokens",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"\x0a\x02\xff\xfe", timeout=10)  # texts[0] = 2 bytes of invalid UTF-8
                raise AssertionError("accepted invalid UTF-8")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "could not be parsed" in err.details()
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
