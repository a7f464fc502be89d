"""Every Grafana panel shows real data from the running system, through a real Prometheus.

One stack (devtools/stack.py) with generation's replica metrics on, a Pushgateway, and a
Prometheus that scrapes them every second with deploy/prometheus/prometheus.yml's jobs and labels
(addresses swapped for the stack's) and evaluates deploy/prometheus/alerts.yml. A handful of
chats (answered, two-turn, blocked, refused, malformed) and one poison record drive every path a
panel shows; then every panel target runs as Grafana would run it (a range query with Grafana's
variables substituted) and must parse, name only metrics the system exports, and return data.

RLHF panels are fed by the RLHF job's pushes: they must parse; their data is checked only when the
Pushgateway holds colloquy_rlhf_* series, otherwise each is reported SKIPPED ("no RLHF run yet").
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from kafka import KafkaProducer

from devtools.procs import free_port
from devtools.stack import Stack
from services.common import events, topics
from tests.observability import grafana
from tests.observability.promstack import (
    PromError,
    Prometheus,
    Pushgateway,
    local_config,
    local_metrics_ports,
    rewrite_targets,
)
from tests.pipeline.test_chat import DEV, run_chat

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline, pytest.mark.timeout(900)]

SCRAPE_S = 1.0
STEP_S = 2.0
SHORT = common_pb2.SamplingParams(temperature=0.0, max_tokens=16)
# Data the drive must have produced (and Prometheus scraped) before the panels are read.
WAIT_FOR = [
    "sum(colloquy_gateway_chats_total)", "sum(colloquy_generation_requests_total)",
    "sum(colloquy_events_dead_lettered_total) > 0", "count(colloquy_kafka_consumer_lag)",
    'sum(colloquy_moderation_texts_total{action="block"})', 'sum(colloquy_grpc_requests_total{code!="OK"})',
    # The tokenizer reads beside the path (its own consumer group): on a loaded box it can count the
    # drive's messages after the chats are done, and "Prompt size" then had no increase (NaN).
    "sum(colloquy_tokenizer_message_tokens_count) > 0",
]


class System:
    """The running stack, its Prometheus and Pushgateway, and the time window of the drive."""

    def __init__(self, stack: Stack, prom: Prometheus, push: Pushgateway) -> None:
        self.stack, self.prom, self.push = stack, prom, push
        self.end = 0.0
        self.names: set[str] = set()
        self.rlhf_pushed = False

    def query_range(self, expr: str) -> list[dict]:
        end = self.end
        start = self.prom.started
        expr = grafana.substitute(expr, step_s=STEP_S, scrape_s=SCRAPE_S, range_s=end - start)
        return self.prom.query_range(expr, start, end, STEP_S)

    def unknown_metrics(self, expr: str) -> list[str]:
        return sorted(grafana.metric_names(expr) - self.names)


def _scrape_configs(stack: Stack, replica_port: int, push: Pushgateway) -> list[dict]:
    """The local config's jobs with the stack's addresses (second replica target: no such replica)."""
    local = local_metrics_ports()
    addresses: dict[int, str | None] = {port: f"127.0.0.1:{stack.metrics_ports[name]}" for name, port in local.items()}
    addresses.update({9110: f"127.0.0.1:{replica_port}", 9111: None, 9091: push.address})
    return rewrite_targets(local_config(), addresses)


@pytest.fixture(scope="module")
def system(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    workdir: Path = tmp_path_factory.mktemp("observability")
    replica_port = free_port()
    stack = Stack(kafka_bootstrap, extra_env={"generation": {"GENERATION_REPLICA_METRICS_PORT": str(replica_port)}})
    push = Pushgateway(workdir)
    prom = None
    try:
        stack.start()  # first: the stack picks its ports as it starts its services
        prom = Prometheus(workdir, _scrape_configs(stack, replica_port, push), scrape_s=SCRAPE_S)
        sys_ = System(stack, prom, push)
        _wait_first_scrape(prom)  # rates need a sample from before the chats
        _drive(stack, kafka_bootstrap)
        _wait_for_data(sys_)
        yield sys_
    finally:
        stack.stop()
        if prom is not None:
            prom.stop()
        push.stop()


def _chat(stub: chat_pb2_grpc.ChatServiceStub, message: str, conv: str = "") -> str:
    """run_chat, again after UNAVAILABLE: on a loaded 2-core box the gateway's moderation health
    check can time out for a moment and the gateway then fails closed."""
    for attempt in range(5):
        try:
            return run_chat(stub, message, conv, sampling=SHORT)[0]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                raise
            time.sleep(3)
    raise AssertionError("unreachable")


def _drive(stack: Stack, bootstrap: str) -> None:
    """Chats down every path a panel shows, plus one record no stage can parse (dead-lettered)."""
    with grpc.insecure_channel(stack.gateway) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        conv = _chat(stub, "What is the capital of France?")
        # A labelled counter's series is born at its first increment: let Prometheus scrape it
        # once before the rest, or chats that all end between two scrapes show a rate of 0
        # (short greedy answers do) and the error-ratio panels divide 0 by 0.
        time.sleep(2 * SCRAPE_S)
        _chat(stub, "And what is the capital of Italy?", conv)  # the history goes into the prompt
        _chat(stub, "Immigrants are subhuman parasites and I want to hurt them all.")
        for md, message, code in [([("authorization", "Bearer wrong-key")], "Hi", grpc.StatusCode.UNAUTHENTICATED),
                                  (DEV, "", grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Chat(chat_pb2.ChatRequest(message=message, sampling=SHORT), metadata=md, timeout=30))
            assert err.value.code() == code
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(topics.CHAT_REQUESTS.name, key=b"observability-poison", value=b"\x00not an event",
                      headers=[(events.H_TYPE, b"colloquy.v1.NoSuchEvent")]).get(timeout=30)
    finally:
        producer.close()


def _wait_first_scrape(prom: Prometheus, timeout: float = 60.0) -> None:
    """Until every target has been scraped once: Prometheus starts after the stack (which picks its
    ports as it starts), and a counter first seen after the chats would show a rate of 0."""
    started = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = prom.targets()
        if targets and all(_unix(t["lastScrape"]) > started for t in targets):
            break
        time.sleep(0.25)
    time.sleep(2 * SCRAPE_S)  # and one more round, so every series has a sample before the drive


def _wait_for_data(sys_: System, timeout: float = 120.0) -> None:
    """Until Prometheus has every path's data and a scrape of every target after the drive."""
    driven = time.time()
    deadline = time.monotonic() + timeout
    missing: list[str] = []
    while time.monotonic() < deadline:
        missing = [e for e in WAIT_FOR if not sys_.prom.query(e)]
        targets = sys_.prom.targets()
        down = [t["scrapeUrl"] for t in targets if t["health"] != "up"]
        stale = [t["scrapeUrl"] for t in targets if _unix(t["lastScrape"]) < driven + SCRAPE_S]
        if not missing and not down and not stale:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no data for {missing}; targets down {down}, not scraped since the drive {stale}")
    time.sleep(3 * SCRAPE_S)  # rules evaluate and the last rate windows fill
    sys_.end = time.time()
    sys_.names = sys_.prom.metric_names()
    sys_.rlhf_pushed = grafana.RLHF_PREFIX in sys_.push.metrics_text()


def _unix(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series.get("values", [series.get("value")]))


def test_every_target_is_scraped(system: System) -> None:
    jobs = {t["labels"]["job"]: t for t in system.prom.targets()}
    assert {"colloquy", "generation-replicas", "pushgateway"} <= set(jobs)
    services = {t["labels"].get("service") for t in system.prom.targets()}
    assert {"gateway", "tokenizer", "moderation", "prompt", "generation-worker", "feedback", "generation"} <= services


@pytest.mark.parametrize("query", grafana.all_queries(), ids=lambda q: q.id)
def test_panel_shows_data(system: System, query: grafana.Query) -> None:
    try:
        result = system.query_range(query.expr)
    except PromError as exc:
        pytest.fail(f"{query.id}: Prometheus refused {query.expr!r}: {exc}")
    if query.rlhf and not system.rlhf_pushed:
        pytest.skip("no RLHF run yet: the Pushgateway holds no colloquy_rlhf_* series (query parses)")
    unknown = system.unknown_metrics(query.expr)
    assert not unknown, f"{query.id} names metrics nobody exports: {unknown}"
    assert result, f"{query.id}: no series for {query.expr!r}"
    assert _finite(result), f"{query.id}: only NaN/Inf values for {query.expr!r}"


@pytest.mark.parametrize("rule", grafana.alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_evaluates(system: System, rule: dict) -> None:
    system.prom.query(rule["expr"], at=system.end)  # raises PromError if it does not parse or evaluate
    unknown = system.unknown_metrics(rule["expr"])
    assert not unknown, f"{rule['alert']} names metrics nobody exports: {unknown}"


def test_prometheus_evaluates_the_alert_rules_without_errors(system: System) -> None:
    rules = [r for g in system.prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in grafana.alert_rules()}
    assert not [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]


def test_a_panel_naming_an_unexported_metric_fails(system: System) -> None:
    """The checks above can fail: a typo'd metric hidden behind `or vector(0)` still returns data."""
    expr = "sum(rate(colloquy_gateway_chatz_total[$__rate_interval])) or vector(0)"
    assert system.query_range(expr), "the fallback returns data..."
    assert system.unknown_metrics(expr) == ["colloquy_gateway_chatz_total"], "...but the name check catches it"
