"""Pure parts of the generation service: validation, offset tracking, progress batching, config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from colloquy.v1 import common_pb2, events_pb2, generation_pb2
from kafka import TopicPartition

from services.generation import api, engine, serving
from services.generation.config import DEFAULT_SERVE_CONFIG
from services.generation.worker import OffsetTracker, _Progress

LIMITS = {"max_tokens_limit": 512, "max_n": 4}


def req(prompt: str = "hi", **sampling: object) -> generation_pb2.GenerateRequest:
    stop = sampling.pop("stop", [])
    p = common_pb2.SamplingParams(**sampling)  # type: ignore[arg-type]
    p.stop.extend(stop)  # type: ignore[arg-type]
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=p, request_id="r1", conversation_id="c1")


@pytest.mark.parametrize(("request_", "field"), [
    (req(""), "prompt"),
    (req("   \n"), "prompt"),
    (req("a\x00b"), "prompt"),
    (req(n=0), "sampling.n"),
    (req(n=5), "sampling.n"),
    (req(max_tokens=0), "sampling.max_tokens"),
    (req(max_tokens=513), "sampling.max_tokens"),
    (req(temperature=-0.1), "sampling.temperature"),
    (req(temperature=2.5), "sampling.temperature"),
    (req(top_p=0.0), "sampling.top_p"),
    (req(top_p=1.5), "sampling.top_p"),
    (req(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    (req(stop=["x" * 65]), "sampling.stop[0]"),
    (req(stop=["ok", ""]), "sampling.stop[1]"),
])
def test_invalid_input_names_the_field(request_: generation_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(api.InvalidArgument) as err:
        api.generate_request(request_, **LIMITS)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_defaults_and_mapping() -> None:
    r = api.generate_request(req("hello", seed=5, stop=["\n\n"]), **LIMITS)
    # temperature, top_p, top_k and the repetition penalty stay unset: the answering model fills them
    assert r.sampling == engine.Sampling(max_tokens=256, stop=("\n\n",), seed=5, n=1)
    assert r.sampling.temperature is None and r.sampling.repetition_penalty is None
    assert r.sampling.copy_penalty is None
    explicit = req("hello", temperature=0.0, top_k=3, repetition_penalty=1.5, copy_penalty=0.0)
    s = api.generate_request(explicit, **LIMITS).sampling
    assert (s.temperature, s.top_k, s.repetition_penalty, s.copy_penalty) == (0.0, 3, 1.5, 0.0)
    assert r.request_id == "r1" and r.conversation_id == "c1"
    assert api.generate_request(generation_pb2.GenerateRequest(prompt="x"), **LIMITS).request_id
    msgs = api.responses([engine.Delta(1, "ab", 2, engine.FinishReason.STOP, "v7", 9, 12),
                          engine.Delta(0, "c", 1, None, "v7", 9, 3)])
    assert msgs[0].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert (msgs[0].usage.prompt_tokens, msgs[0].usage.completion_tokens) == (9, 12)
    assert not msgs[1].HasField("usage") and msgs[1].model_version == "v7" and msgs[1].delta_tokens == 1


def test_offset_tracker_commits_only_contiguous_completions() -> None:
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    t = OffsetTracker()
    for o in (10, 11, 12):
        t.started(tp, o)
    t.started(other, 3)
    assert t.to_commit() == {tp: 10, other: 3}
    t.committed(t.to_commit())
    t.finished(tp, 11)  # out of order: 10 still running
    assert t.to_commit() == {}
    t.finished(tp, 10)
    assert t.to_commit() == {tp: 12}
    t.finished(tp, 12)
    t.finished(other, 3)
    assert t.to_commit() == {tp: 13, other: 4}
    t.clear()
    t.finished(tp, 99)  # a stale completion after the consumer closed is ignored
    assert t.to_commit() == {}


def test_offset_tracker_keeps_points_of_partitions_a_rebalance_hands_back() -> None:
    # kafka-python keeps the fetch position of a partition reassigned to the same consumer: its
    # records are not read again, so what finished around the rebalance must still be committed.
    kept, moved = TopicPartition("t", 0), TopicPartition("t", 1)
    t = OffsetTracker()
    for tp in (kept, moved):
        t.started(tp, 0)
        t.started(tp, 1)
    t.committed(t.to_commit())
    t.finished(kept, 0)
    t.revoke({kept, moved})
    assert t.to_commit() == {}  # nothing is committed while the rebalance runs
    t.finished(kept, 1)  # completions during the rebalance still count
    t.finished(moved, 0)
    t.assign({kept})
    assert t.to_commit() == {kept: 2}  # moved: the next owner reads on from its committed offset
    t.started(kept, 2)
    t.revoke({kept})
    t.assign({kept})
    t.started(kept, 3)
    t.finished(kept, 3)
    assert t.point(kept) == 2  # 2 ran across the rebalance: a later record's completion cannot pass it


def test_progress_batches_cumulative_text() -> None:
    turn = events_pb2.TurnEvent(request_id="r", conversation_id="c", prompt="PROMPT")
    p = _Progress(turn, 2, batch_tokens=4, batch_s=10.0)
    d = lambda i, t, f=None: engine.Delta(i, t, 1, f, "v1", 5, 0)  # noqa: E731
    p.apply([d(0, "a")])
    assert p.due()  # first token goes out at once
    first = p.message(done=False)
    assert first.turn.prompt == "PROMPT" and first.seq == 0 and first.first_token_unix_ms > 0
    p.apply([d(0, "b"), d(1, "x")])
    assert not p.due()  # 2 tokens < 4 and 10 s not passed
    p.apply([d(0, "c"), d(1, "y", engine.FinishReason.LENGTH)])
    assert p.due()
    second = p.message(done=False)
    assert second.turn.prompt == "" and second.turn.request_id == "r" and second.seq == 1
    assert [(c.index, c.text, c.finish_reason) for c in second.candidates] == [
        (0, "abc", generation_pb2.FINISH_REASON_UNSPECIFIED), (1, "xy", generation_pb2.FINISH_REASON_LENGTH)]
    p.batch_s = 0.01
    p.apply([d(0, "d")])
    time.sleep(0.02)
    assert p.due()  # the time rule
    p.message(done=False)
    # A retried stream must not publish shorter cumulative text than already sent.
    p.restart()
    p.apply([d(0, "ab"), d(1, "xy")])
    assert not p.caught_up() and not p.due()
    p.apply([d(0, "cd")])
    assert p.caught_up()


def test_serve_config_is_valid_and_overridable() -> None:
    cfg = serving.load_config(DEFAULT_SERVE_CONFIG, grpc_port=19999,
                              deployment_overrides={"autoscaling_config": None, "num_replicas": 1})
    assert cfg.grpc_options.port == 19999
    assert "services.generation.ingress.add_GenerationServiceServicer_to_server" in \
        cfg.grpc_options.grpc_servicer_functions
    app = cfg.applications[0]
    assert app.import_path == "services.generation.deployment:build"
    dep = app.deployments[0]
    assert dep.num_replicas == 1
    base = serving.load_config(DEFAULT_SERVE_CONFIG)
    auto = base.applications[0].deployments[0].autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
    assert auto["target_ongoing_requests"] > 0
    assert base.grpc_options.port == 9000
    router = base.applications[0].deployments[0].request_router_config
    assert router["request_router_class"] == "services.generation.router.ConversationAffinityRouter"


def test_ingress_parser_turns_bad_bytes_into_undecodable() -> None:
    from colloquy.v1 import generation_pb2

    from services.generation import ingress

    good = generation_pb2.GenerateRequest(prompt="hi").SerializeToString()
    assert ingress.parse(good).prompt == "hi"
    bad = ingress.parse(b"\x0a\xff\xff\xff")
    assert isinstance(bad, ingress.Undecodable) and bad.error


def test_unset_sampling_comes_from_the_answering_versions_manifest(tmp_path) -> None:
    import json
    from types import SimpleNamespace

    from services.generation.runner import LoadedModel, sampling_defaults

    genai = {"search": {"top_k": 40}}
    base = sampling_defaults(tmp_path, genai)  # no manifest (an explicit model dir): the base model's
    assert (base["temperature"], base["top_p"], base["repetition_penalty"]) == (0.0, 0.9, 1.1)
    assert base["candidates_temperature"] == 0.2
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"sampling": {"temperature": 0.5, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.3,
                      "repetition_window": 32}}))
    d = sampling_defaults(tmp_path, genai)
    model = SimpleNamespace(sampling=d, top_k=d["top_k"])
    s = LoadedModel.resolve(model, engine.Sampling(max_tokens=5))  # type: ignore[arg-type]
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.5, 0.8, 7, 1.3)
    # a version recorded before the copy guard existed gets the base model's guard
    assert (d["copy_penalty"], d["copy_base"], d["copy_allowed"]) == (
        base["copy_penalty"], base["copy_base"], base["copy_allowed"])
    assert s.copy_penalty == base["copy_penalty"] > 0
    assert LoadedModel.resolve(model, engine.Sampling(copy_penalty=0.0)).copy_penalty == 0.0  # type: ignore[arg-type]
    several = LoadedModel.resolve(model, engine.Sampling(max_tokens=5, n=3))  # type: ignore[arg-type]
    assert several.temperature == 0.5  # this manifest names no candidates_temperature
    d["candidates_temperature"] = 0.9
    assert LoadedModel.resolve(model, engine.Sampling(max_tokens=5, n=3)).temperature == 0.9  # type: ignore[arg-type]
    s = LoadedModel.resolve(model, engine.Sampling(temperature=0.0, top_p=1.0, top_k=0,  # type: ignore[arg-type]
                                                   repetition_penalty=1.0))
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 1.0, 0, 1.0)  # explicit wins


@pytest.mark.parametrize("exc", [
    engine.InvalidRequest("prompt", "2250 tokens, but the model's context is 2048 tokens"),
    engine.Overloaded("generation is at capacity"),
    engine.DeadlineExceeded("deadline passed"),
    engine.EngineClosed("shutting down"),
    api.InvalidArgument("sampling.n: must be at least 1"),
])
def test_errors_a_replica_raises_survive_ray_pickling_with_their_type_and_text(exc: Exception) -> None:
    """Ray pickles a replica's exception for Serve's gRPC proxy: one that cannot be rebuilt reaches
    the caller as INTERNAL "Failed to deserialize exception" instead of its own status."""
    import pickle

    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert getattr(back, "field", None) == getattr(exc, "field", None)


def test_cudart_search_covers_wheels_on_sys_path_and_versioned_sonames(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA 13 wheel keeps libcudart in nvidia/cu13/lib of whatever site dir holds it (not always
    ONNX Runtime's), and toolkits ship only versioned names: both must be searched."""
    from services.generation.kv_cache import _cudart_candidates

    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.13").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = _cudart_candidates()
    assert str(lib / "libcudart.so.13") in names
    assert names.index("libcudart.so.13") < names.index("libcudart.so")


def test_page_locked_logits_buffer_is_a_numpy_view_freed_with_it() -> None:
    """`_Cuda.host_array` over a stand-in runtime (libc malloc/free in place of cudaMallocHost/
    cudaFreeHost): a writable array of the asked shape on the allocated memory, freed once."""
    import ctypes
    import ctypes.util
    import gc

    import numpy as np

    from services.generation.kv_cache import _Cuda

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    freed: list[int] = []

    class Runtime:
        def cudaMallocHost(self, out: object, size: ctypes.c_size_t) -> int:
            ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = libc.malloc(size.value)
            return 0

        def cudaFreeHost(self, ptr: ctypes.c_void_p) -> int:
            freed.append(ptr.value or 0)
            libc.free(ptr)
            return 0

    cuda = object.__new__(_Cuda)
    cuda.lib = Runtime()
    arr = cuda.host_array((3, 1, 5), np.float16)
    assert arr.shape == (3, 1, 5) and arr.dtype == np.float16 and arr.flags.writeable
    arr[:] = 1.5
    address = arr.ctypes.data
    assert float(arr.sum()) == 22.5 and not freed
    del arr
    gc.collect()
    assert freed == [address]


def test_shutdown_ray_collects_first_and_keeps_collection_off_while_ray_disconnects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection inside ray.shutdown() can finalize an ObjectRef after the core worker is gone,
    which ends the process; shutdown_ray collects before it and holds automatic collection off."""
    import gc
    import weakref

    import ray

    class Cycle:  # stands in for Serve's routers: garbage only the cyclic collector frees
        def __init__(self) -> None:
            self.me = self

    seen: list[tuple[bool, bool]] = []  # (collection enabled, the cycle still alive) in shutdown
    alive = [True]

    def fake_shutdown() -> None:
        seen.append((gc.isenabled(), alive[0]))

    monkeypatch.setattr(ray, "shutdown", fake_shutdown)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    c = Cycle()
    weakref.finalize(c, lambda: alive.__setitem__(0, False))
    del c
    assert gc.isenabled()
    serving.shutdown_ray()
    assert seen == [(False, False)]
    assert gc.isenabled()  # enabled again afterwards
    gc.disable()
    try:
        serving.shutdown_ray(serve_apps=False)
        assert not gc.isenabled()  # a caller's own setting is kept
    finally:
        gc.enable()


def test_a_turns_answer_stops_join_the_clients_stop_strings() -> None:
    turn = events_pb2.TurnEvent(request_id="r1", conversation_id="c1", prompt="hi",
                                sampling=common_pb2.SamplingParams(stop=["\n\n"]),
                                answer_stops=["(Answer this"])
    assert api.turn_request(turn, **LIMITS).sampling.stop == ("\n\n", "(Answer this")
    for stops, error in ((["a"] * 5, "answer_stops: 5 texts, at most 4"), ([""], "answer_stops: each text")):
        del turn.answer_stops[:]
        turn.answer_stops.extend(stops)
        with pytest.raises(api.InvalidArgument, match=error.replace("(", r"\(")):
            api.turn_request(turn, **LIMITS)


def test_an_answer_stops_before_a_copied_reminder_and_the_blank_line_before_it() -> None:
    from services.generation.stop import StopMatcher
    from services.prompt.templates import PromptTemplate

    stops = PromptTemplate("v", "Be kind.", "(Answer this message directly and briefly.)").answer_stops
    matcher, shown = StopMatcher(stops), []
    for piece in ["I'm glad I could help.", "\n\n", "(", "Answer", " this", " message"]:
        text, stopped = matcher.feed(piece)
        shown.append(text)
        if stopped:
            break
    assert "".join(shown) == "I'm glad I could help." and stopped
    # A paragraph break that is not the reminder is only held until the next piece.
    matcher = StopMatcher(stops)
    assert [matcher.feed(p) for p in ["One.", "\n\n", "Two."]] == [("One.", False), ("", False), ("\n\nTwo.", False)]
