"""The dashboards, Grafana provisioning and local Prometheus config, checked without the stack.

Every query is also parsed by a real Prometheus here (no targets: fast); whether each panel shows
data from the running system is tests/observability/test_dashboards.py's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.observability import grafana
from tests.observability.promstack import PromError, Prometheus, local_config, local_metrics_ports

DASHBOARDS = {p.stem: p for p in grafana.dashboard_files()}

# What the issue asks each dashboard to show, as the metric names that show it.
REQUIRED = {
    "colloquy-overview": {
        "colloquy_gateway_chats_total", "colloquy_grpc_requests_total",
        "colloquy_gateway_chat_duration_seconds_bucket", "colloquy_gateway_time_to_first_token_seconds_bucket",
        "colloquy_generation_generated_tokens_total"},
    "colloquy-pipeline": {
        "colloquy_event_processing_seconds_bucket", "colloquy_kafka_consumer_lag", "colloquy_events_consumed_total",
        "colloquy_events_failed_total", "colloquy_events_dead_lettered_total"},
    "colloquy-moderation": {"colloquy_moderation_decisions_total", "colloquy_moderation_texts_total",
                            "colloquy_moderation_seconds_bucket"},
    "colloquy-model": {
        "colloquy_generation_model_info", "colloquy_generation_time_to_first_token_seconds_bucket",
        "colloquy_generation_inter_token_latency_seconds_bucket", "colloquy_generation_request_duration_seconds_bucket",
        "colloquy_generation_queue_time_seconds_bucket", "colloquy_generation_running_sequences",
        "colloquy_generation_waiting_requests", "colloquy_generation_batch_size_bucket",
        "colloquy_generation_prompt_tokens_total", "colloquy_generation_generated_tokens_total",
        "colloquy_generation_kv_cache_usage_ratio",
        *(f"colloquy_rlhf_{n}" for n in (
            "reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl",
            "reward_model_accuracy", "reward_model_loss", "step", "phase_seconds"))},
}


def test_the_four_dashboards_exist() -> None:
    assert set(DASHBOARDS) == set(REQUIRED)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_dashboard_shows_what_the_issue_asks(name: str) -> None:
    shown = {n for q in grafana.queries(DASHBOARDS[name]) for n in grafana.metric_names(q.expr)}
    assert REQUIRED[name] <= shown, f"missing: {sorted(REQUIRED[name] - shown)}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name: str) -> None:
    doc = grafana.load(DASHBOARDS[name])
    assert doc["uid"] == name and doc["title"].startswith("Colloquy / ")
    [var] = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert var["name"] == "datasource" and var["query"] == "prometheus"
    ids = [p["id"] for p in grafana.panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in grafana.panels(doc):
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_uids_are_unique() -> None:
    uids = [grafana.load(p)["uid"] for p in DASHBOARDS.values()]
    assert len(uids) == len(set(uids))


def test_provisioning_points_at_the_dashboards_and_the_datasource() -> None:
    prov = grafana.GRAFANA / "provisioning"
    [ds_file] = list((prov / "datasources").glob("*.yaml"))
    [ds] = yaml.safe_load(ds_file.read_text(encoding="utf-8"))["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:9090"
    for path in DASHBOARDS.values():  # the default the dashboards' datasource variable selects
        [var] = [v for v in grafana.load(path)["templating"]["list"] if v["name"] == "datasource"]
        assert var["current"]["value"] == ds["uid"]
    [db_file] = list((prov / "dashboards").glob("*.yaml"))
    [provider] = yaml.safe_load(db_file.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()


def test_substitution_replaces_grafana_variables() -> None:
    expr = "rate(x[$__rate_interval]) + increase(y[${__range}]) + z[$__interval] * $__range_s"
    assert grafana.substitute(expr, step_s=2, scrape_s=1, range_s=600) == \
        "rate(x[4000ms]) + increase(y[600000ms]) + z[2000ms] * 600"
    with pytest.raises(ValueError, match=r"\$service"):
        grafana.substitute('up{service="$service"}', step_s=2, scrape_s=1, range_s=60)


def test_metric_names_are_found_in_expressions() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(colloquy_a_bucket{job="colloquy-rlhf"}[1m]))) / up{}'
    assert grafana.metric_names(expr) == {"colloquy_a_bucket", "up"}


def test_local_prometheus_scrapes_the_ports_the_demo_stack_uses() -> None:
    """deploy/prometheus/prometheus.yml vs the local stack (devtools/services.py; and generation's replica port)."""
    from services.generation.config import EngineSettings

    config = local_config()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    by_service = {sc["labels"]["service"]: sc["targets"] for sc in jobs["colloquy"]["static_configs"]}
    ports = local_metrics_ports()
    assert ports, "devtools/services.py lists no service"
    for name, port in ports.items():
        label = "generation-worker" if name == "generation" else name
        assert by_service.get(label) == [f"127.0.0.1:{port}"], f"{name}: the local stack serves metrics on {port}"
    replica = EngineSettings.__dataclass_fields__["replica_metrics_port"].default
    [replicas] = jobs["generation-replicas"]["static_configs"]
    assert f"127.0.0.1:{replica}" in replicas["targets"]
    push = jobs["pushgateway"]
    assert push["honor_labels"] is True and push["static_configs"][0]["targets"] == ["127.0.0.1:9091"]
    assert "alerts.yml" in config["rule_files"]


@pytest.fixture(scope="module")
def bare_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prom"), scrape_configs=[])
    try:
        yield prom
    finally:
        prom.stop()


@pytest.mark.parametrize("query", grafana.all_queries(), ids=lambda q: q.id)
def test_query_parses(bare_prometheus: Prometheus, query: grafana.Query) -> None:
    expr = grafana.substitute(query.expr, step_s=15, scrape_s=5, range_s=3600)
    bare_prometheus.query(expr)  # raises PromError (bad_data) if it does not parse


def test_a_broken_query_is_refused(bare_prometheus: Prometheus) -> None:
    with pytest.raises(PromError, match="bad_data"):
        bare_prometheus.query("sum by (le (rate(colloquy_x[1m]))")


def test_rlhf_panels_show_what_the_rlhf_job_pushes(tmp_path: Path) -> None:
    """The RLHF job's own push code (rlhf.metrics) -> a real Pushgateway -> Prometheus with the
    local `pushgateway` job: every RLHF panel returns data, under job="colloquy-rlhf"."""
    rlhf_metrics = pytest.importorskip("rlhf.metrics", reason="the RLHF job is not in the tree yet")
    from tests.observability.promstack import Pushgateway, rewrite_targets

    push = Pushgateway(tmp_path)
    prom = None
    try:
        jobs = [j for j in local_config()["scrape_configs"] if j["job_name"] == "pushgateway"]
        prom = Prometheus(tmp_path, rewrite_targets({"scrape_configs": jobs}, {9091: push.address}))
        job = rlhf_metrics.JobMetrics(f"http://{push.address}")
        job.update({key: 0.5 for key in rlhf_metrics.GAUGES}, {"reward_model": 12.0, "ppo": 30.0})
        rlhf = [q for q in grafana.all_queries() if q.rlhf]
        assert len(rlhf) >= 11
        deadline = time.monotonic() + 30
        while not prom.query("colloquy_rlhf_step") and time.monotonic() < deadline:
            time.sleep(0.5)
        for q in rlhf:
            expr = grafana.substitute(q.expr, step_s=1, scrape_s=1, range_s=60)
            assert prom.query(expr), f"{q.id}: no data for {expr!r} after the RLHF job pushed"
    finally:
        if prom is not None:
            prom.stop()
        push.stop()
