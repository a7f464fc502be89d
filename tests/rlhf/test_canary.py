"""rlhf.canary: the decision, the watch loop, the registry record, and the PromQL against a real
Prometheus scraping the services' real metric objects."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from model.registry import Registry
from rlhf import canary
from rlhf.canary import INCONCLUSIVE, PROMOTE, ROLLBACK, VersionStats, decide
from rlhf.config import load_canary_config

CFG = load_canary_config(min_requests=20, min_ratings=10, watch_s=100, interval_s=10, extensions=1, warmup_s=0)


def stats(version: str, *, requests: float = 100, errors: float = 1, p50: float = 0.2, p95: float = 0.5,
          verdicts: float = 100, blocked: float = 2, up: float = 30, down: float = 10) -> VersionStats:
    return VersionStats(version, requests, errors, requests, p50, p95, verdicts, blocked, up, down)


STABLE = stats("stable")


def test_a_canary_as_good_as_stable_is_promoted() -> None:
    d = decide(stats("c", errors=1.5, p50=0.22, p95=0.6, blocked=3, up=28, down=12), STABLE, CFG)
    assert d.outcome == PROMOTE
    assert [c.passed for c in d.checks] == [True] * 5
    assert any(r.startswith("thumbs-up ratio: canary 0.7 vs stable 0.75, within") for r in d.reasons)


@pytest.mark.parametrize(("bad", "check"), [
    ({"errors": 8}, "error rate"),                      # 8% against 1% + 1 point, z 2.05
    ({"p50": 0.35}, "TTFT p50 (s)"),                    # limit 0.2 * 1.25 + 0.05 = 0.3
    ({"p95": 0.8}, "TTFT p95 (s)"),                     # limit 0.675
    ({"blocked": 40}, "output block rate"),             # 40% against 2% + 2 points
    ({"up": 10, "down": 30}, "thumbs-up ratio"),        # 25% against 75% - 10 points
])
def test_one_check_outside_its_tolerance_rolls_back(bad: dict[str, float], check: str) -> None:
    d = decide(stats("c", **bad), STABLE, CFG)
    assert d.outcome == ROLLBACK
    assert [c.name for c in d.checks if c.passed is False] == [check]
    assert len(d.reasons) == 1 and d.reasons[0].startswith(f"{check}: canary") and "outside" in d.reasons[0]


def test_too_few_samples_is_inconclusive_not_a_verdict() -> None:
    few = stats("c", requests=5, errors=5, verdicts=5, blocked=5, up=1, down=2)  # all bad, but 5 < 20
    d = decide(few, STABLE, CFG)
    assert d.outcome == INCONCLUSIVE
    assert all(c.passed is None for c in d.checks)
    assert "error rate: too few samples (n=5/100, canary/stable)" in d.reasons
    # a failure on enough samples still rolls back while other checks wait for theirs
    d = decide(stats("c", requests=100, errors=50, up=1, down=0), STABLE, CFG)
    assert d.outcome == ROLLBACK and d.reasons[0].startswith("error rate")


def test_a_rate_past_its_limit_by_chance_waits_for_more_samples() -> None:
    d = decide(stats("c", errors=3), STABLE, CFG)  # 3% against 1% + 1 point on 100 requests: z 0.51
    assert d.outcome == INCONCLUSIVE
    assert d.reasons == ["error rate: canary 0.03 vs stable 0.01, past the limit 0.02 but within chance "
                         "(n=100/100, z=0.51)"]
    big = dataclasses.replace(STABLE, requests=4000, errors=40)
    assert decide(stats("c", requests=4000, errors=120), big, CFG).outcome == ROLLBACK  # 3% vs 1% on 4000


def test_min_ratings_zero_leaves_thumbs_out() -> None:
    d = decide(stats("c", up=0, down=0), STABLE, dataclasses.replace(CFG, min_ratings=0))
    assert d.outcome == PROMOTE and "thumbs-up ratio" not in [c.name for c in d.checks]


def test_eligible_needs_a_passed_gate_and_a_passed_replay() -> None:
    passed = {"quality": {"gate": {"passed": True}}, "training": {"replay": {"passed": True}}}
    assert canary.eligible(passed)[0]
    assert canary.eligible({"quality": {"gate": {"passed": True}}}, {"replay": {"passed": True}})[0]
    assert canary.eligible({"quality": None}) == (False, "no record of the quality gate")
    assert canary.eligible({"quality": {"gate": {"passed": False}}}) == (False, "failed the quality gate")
    assert canary.eligible({"quality": {"gate": {"passed": True}}}) == (False, "no replay evaluation recorded")
    failed = {"quality": {"gate": {"passed": True}}, "training": {"replay": {"passed": False}}}
    assert canary.eligible(failed) == (False, "failed the replay evaluation")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, s: float) -> None:
        self.now += s

    def __call__(self) -> float:
        return self.now


def test_watch_promotes_only_at_the_end_and_rolls_back_early() -> None:
    clock = FakeClock()
    d, looks = canary.watch(lambda e, c, s: (stats(c), stats(s)), "c", "s", CFG, clock.sleep, clock)
    assert d.outcome == PROMOTE and [x["elapsed_s"] for x in looks] == [10.0 * k for k in range(1, 11)]

    clock = FakeClock()
    def source(elapsed: float, c: str, s: str) -> tuple[VersionStats, VersionStats]:
        return (stats(c, errors=30) if elapsed >= 30 else stats(c)), stats(s)
    d, looks = canary.watch(source, "c", "s", CFG, clock.sleep, clock)
    assert d.outcome == ROLLBACK and len(looks) == 3 and d.reasons[0].startswith("error rate")


def test_the_warmup_is_not_judged() -> None:
    clock, seen = FakeClock(), []

    def source(elapsed: float, c: str, s: str) -> tuple[VersionStats, VersionStats]:
        seen.append((clock.now, elapsed))
        return stats(c), stats(s)
    d, _ = canary.watch(source, "c", "s", dataclasses.replace(CFG, warmup_s=30), clock.sleep, clock)
    assert d.outcome == PROMOTE and seen[0] == (40.0, 10.0) and seen[-1] == (130.0, 100.0)


def test_watch_extends_once_then_rolls_back_what_it_could_not_prove() -> None:
    clock = FakeClock()
    d, looks = canary.watch(lambda e, c, s: (stats(c, requests=3), stats(s)), "c", "s", CFG, clock.sleep, clock)
    assert d.outcome == ROLLBACK and len(looks) == 20  # 100 s + one 100 s extension, every 10 s
    assert d.reasons[0].startswith("not proven after 200 s: error rate: too few samples")


def publish(reg: Registry, tmp: Path, version: str, gate: bool | None = True) -> None:
    src = tmp / version
    src.mkdir()
    (src / "model.onnx").write_bytes(version.encode())
    quality = None if gate is None else {"gate": {"passed": gate}}
    reg.publish(src, version, source="test", precision="fp32", execution_provider="cpu", quality=quality,
                training={"replay": {"passed": True}})


class FakeRollout:
    """Moves the registry as services.generation.updates does, without Kafka (unit test of the loop)."""

    def __init__(self, reg: Registry) -> None:
        self.reg, self.calls = reg, []

    def start(self, version: str, percent: int) -> None:
        self.calls.append(("start", version, percent))
        self.reg.set_canary("generation", version, percent)

    def promote(self, version: str) -> None:
        self.calls.append(("promote", version))
        self.reg.set_current("generation", version)
        self.reg.clear_canary("generation")

    def rollback(self) -> None:
        self.calls.append(("rollback",))
        self.reg.clear_canary("generation")


@pytest.mark.parametrize(("canary_stats", "outcome", "serving"), [
    ({}, PROMOTE, "good"), ({"blocked": 60}, ROLLBACK, "stable")])
def test_run_canary_moves_traffic_and_records_why(tmp_path: Path, canary_stats: dict[str, Any],
                                                  outcome: str, serving: str) -> None:
    reg = Registry(tmp_path / "reg")
    for v in ("stable", "good"):
        publish(reg, tmp_path, v)
    reg.set_current("generation", "stable")
    rollout, clock = FakeRollout(reg), FakeClock()
    entry = canary.gated_canary(reg, "generation", "good", 10, CFG, source=lambda e, c, s: (
        stats(c, **canary_stats), stats(s)), rollout=rollout, sleep=clock.sleep, clock=clock)
    assert entry["outcome"] == outcome and entry["stable_version"] == "stable"
    assert rollout.calls[0] == ("start", "good", 10) and rollout.calls[-1][0] == outcome
    assert reg.current("generation") == serving and reg.canary("generation") is None
    assert reg.canary_log("generation") == [entry]
    assert reg.manifest("good")["canary"] == [entry]
    if outcome == ROLLBACK:
        assert entry["reasons"] == [r for r in entry["reasons"] if r.startswith("output block rate")]


def test_gated_canary_refuses_a_child_without_a_passed_gate(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    publish(reg, tmp_path, "stable")
    publish(reg, tmp_path, "nogate", gate=None)
    reg.set_current("generation", "stable")
    rollout = FakeRollout(reg)
    result = canary.gated_canary(reg, "generation", "nogate", 10, CFG, source=lambda *a: pytest.fail("watched"),
                                 rollout=rollout)
    assert result["outcome"] == "not started" and result["reasons"] == ["no record of the quality gate"]
    assert rollout.calls == [] and reg.canary_log("generation") == []


def test_job_flags_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf import job

    for argv, message in ((["--canary", "100"], "--canary must be 0 (off) or 1..99"),
                          (["--canary-watch", "60"], "--canary-watch needs --canary"),
                          (["--canary", "5", "--canary-watch", "0"], "--canary-watch needs --canary")):
        with pytest.raises(SystemExit) as exc:
            job.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_queries_against_a_real_prometheus(tmp_path: Path) -> None:
    """The services' own metric objects, served by prometheus_client and scraped by Debian's
    Prometheus: fetch_stats reads each version's figures back, and a bad canary rolls back."""
    from prometheus_client import start_http_server

    from devtools.procs import free_port
    from services.feedback.worker import RATINGS
    from services.generation import metrics as G
    from services.moderation.metrics import OUTPUT_VERDICTS
    from tests.observability.promstack import Prometheus

    stable, bad = f"st-{time.time_ns()}.1", f"bad-{time.time_ns()}.2"  # dots: the regex escaping
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1")
    for v in (stable, bad):  # every series exists (at 0) before the window's first scrape
        for outcome, action, verdict in (("ok", "allow", "up"), ("error", "block", "down")):
            G.REQUESTS.labels(outcome, v)
            OUTPUT_VERDICTS.labels(v, action)
            RATINGS.labels(v, verdict, "simulated")
        G.TTFT.labels(v)
    prom = Prometheus(tmp_path, [{"job_name": "canary-test", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
                      scrape_s=0.5)
    try:
        deadline = time.monotonic() + 20  # Prometheus applies new targets every 5 s
        while not prom.query("up == 1") and time.monotonic() < deadline:
            time.sleep(0.2)
        # Scrapes with every series at 0 inside the window: its first sample must predate every
        # increment, or increase() extrapolates series differently (CI stop 28, a loaded machine:
        # thumbs-up ratio 0.273 for 0.25). With one target all series share scrape times, so the
        # ratios are exact once every series starts the window at 0.
        time.sleep(2.0)
        start = time.time()
        for v, err, block, ttft, up in ((stable, 1, 2, 0.2, 30), (bad, 20, 40, 0.9, 10)):
            G.REQUESTS.labels("ok", v).inc(100 - err)
            G.REQUESTS.labels("error", v).inc(err)
            OUTPUT_VERDICTS.labels(v, "allow").inc(100 - block)
            OUTPUT_VERDICTS.labels(v, "block").inc(block)
            for _ in range(100):
                G.TTFT.labels(v).observe(ttft)
            RATINGS.labels(v, "up", "simulated").inc(up)
            RATINGS.labels(v, "down", "simulated").inc(40 - up)
        # ...and its last sample must follow every increment (the last series written: bad's downs)
        last = f'colloquy_feedback_ratings_total{{model_version="{bad}",verdict="down"}} == 30'
        deadline = time.monotonic() + 20
        while not prom.query(last) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.6)
        client = canary.Prometheus(f"http://{prom.address}")
        c, s = canary.fetch_stats(client, time.time() - start + 3.0, bad, stable, "simulated")
    finally:
        prom.stop()
        server.shutdown()
    # increase() extrapolates each series to the window's edges a little differently: ratios within 5%
    assert s.requests > 50 and c.requests > 50
    near = {"rel": 0.05}
    assert s.error_rate == pytest.approx(0.01, **near) and c.error_rate == pytest.approx(0.20, **near)
    assert c.block_rate == pytest.approx(0.40, **near) and s.block_rate == pytest.approx(0.02, **near)
    assert c.thumbs_up_ratio == pytest.approx(0.25, **near) and s.thumbs_up_ratio == pytest.approx(0.75, **near)
    assert 0.1 < s.ttft_p50 <= 0.25 and 0.5 < c.ttft_p95 <= 1.0  # inside their buckets
    d = decide(c, s, CFG)
    assert d.outcome == ROLLBACK
    assert {x.name for x in d.checks if x.passed is False} == {
        "error rate", "TTFT p50 (s)", "TTFT p95 (s)", "output block rate", "thumbs-up ratio"}
    with pytest.raises(canary.CanaryError, match="unreachable"):
        canary.Prometheus(f"http://127.0.0.1:{free_port()}").query("vector(1)")


def test_the_services_count_by_the_version_that_answered() -> None:
    """What the canary reads: thumbs from the feedback sink, output verdicts from moderation."""
    from colloquy.v1 import chat_pb2, common_pb2, events_pb2
    from prometheus_client import REGISTRY

    from services.feedback.worker import count_rating
    from services.moderation.metrics import count_output

    v = f"count-{time.time_ns()}"

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"model_version": v, **labels}) or 0.0

    for up, source in ((True, "simulated"), (False, "simulated"), (True, "")):
        count_rating(events_pb2.FeedbackEvent(model_version=v, source=source,
                                              rating=chat_pb2.Rating(thumbs_up=up)))
    count_rating(events_pb2.FeedbackEvent(model_version=v, ranking=chat_pb2.Ranking(order=[1, 0])))
    assert value("colloquy_feedback_ratings_total", verdict="up", source="simulated") == 1
    assert value("colloquy_feedback_ratings_total", verdict="down", source="simulated") == 1
    assert value("colloquy_feedback_ratings_total", verdict="up", source="human") == 1  # unset: human
    count_output(v, common_pb2.ModerationResult(flagged=True, action=common_pb2.MODERATION_ACTION_BLOCK,
                                                categories={"hate": True, "harassment": True}))
    count_output(v, common_pb2.ModerationResult())
    assert value("colloquy_moderation_output_verdicts_total", action="block") == 1  # once, not per category
    assert value("colloquy_moderation_output_verdicts_total", action="allow") == 1
