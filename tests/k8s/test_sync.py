"""Files derived from elsewhere in the repo are current, and land in the rendered objects unchanged."""

from __future__ import annotations

import base64

import pytest
import yaml

from devtools.k8s import manifests, sync
from devtools.k8s.manifests import Obj


def test_generated_files_are_current() -> None:
    stale = [str(p.relative_to(manifests.ROOT)) for p in sync.stale()]
    assert not stale, f"stale generated files {stale}: run scripts/k8s-sync.sh"


def _rayservice(docs: list[Obj]) -> Obj:
    (rs,) = manifests.by_kind(docs, "RayService").values()
    return rs


def test_serve_config_v2_is_the_serve_config_file(docs: list[Obj], overlay: str) -> None:
    """serveConfigV2 == services/generation/serve_config.yaml + the overrides, nothing else."""
    text = _rayservice(docs)["spec"]["serveConfigV2"]
    assert text == sync.serve_config_text(overlay)
    assert yaml.safe_load(text) == sync.serve_config_doc(overlay)
    # The bridge re-applies the very same config (a no-op): the ConfigMap it mounts.
    assert manifests.by_kind(docs, "ConfigMap")["generation-serve-config"]["data"]["serve_config.yaml"] == text


def test_serve_overrides_touch_only_deployment_knobs(overlay: str) -> None:
    """What Kubernetes changes in the Serve config is small and deliberate; the rest is the file's."""
    source = yaml.safe_load(sync.SERVE_SOURCE.read_text(encoding="utf-8"))
    doc = sync.serve_config_doc(overlay)
    assert doc["grpc_options"] == source["grpc_options"]
    assert doc["http_options"]["port"] == source["http_options"]["port"]
    for app, src_app in zip(doc["applications"], source["applications"], strict=True):
        assert {k: v for k, v in app.items() if k != "deployments"} == \
            {k: v for k, v in src_app.items() if k != "deployments"}
        for dep, src_dep in zip(app["deployments"], src_app["deployments"], strict=True):
            assert dep["request_router_config"] == src_dep["request_router_config"]  # affinity stays
            assert dep["user_config"] == src_dep["user_config"]


def test_serve_config_is_a_valid_serve_deploy_schema(overlay: str) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    schema.ServeDeploySchema.model_validate(sync.serve_config_doc(overlay))


def test_prod_serve_replicas_fit_the_gpu_workers(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("prod")
    cluster = _rayservice(docs)["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    dep = sync.serve_config_doc("prod")["applications"][0]["deployments"][0]
    gpus = int(group["rayStartParams"]["num-gpus"])
    assert dep["ray_actor_options"]["num_gpus"] == 1
    per_node = gpus // dep["ray_actor_options"]["num_gpus"]
    auto = dep["autoscaling_config"]
    assert group["minReplicas"] * per_node >= auto["min_replicas"]
    assert group["maxReplicas"] * per_node >= auto["max_replicas"]
    assert int(group["rayStartParams"]["num-cpus"]) >= dep["ray_actor_options"]["num_cpus"] * per_node


class TestMerge:
    def test_dicts_merge_and_null_deletes(self) -> None:
        assert sync.merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}, "d": None, "e": 6}) == \
            {"a": {"b": 5, "c": 2}, "e": 6}

    def test_named_lists_merge_by_name(self) -> None:
        base = [{"name": "x", "v": 1, "w": 1}, {"name": "y", "v": 2}]
        assert sync.merge(base, [{"name": "y", "v": 9}]) == [{"name": "x", "v": 1, "w": 1}, {"name": "y", "v": 9}]

    def test_unknown_name_is_an_error(self) -> None:
        with pytest.raises(sync.MergeError):
            sync.merge([{"name": "x"}], [{"name": "typo"}])

    def test_other_lists_are_replaced(self) -> None:
        assert sync.merge({"l": [1, 2]}, {"l": [3]}) == {"l": [3]}


def test_prometheus_rule_has_the_alert_rules(docs: list[Obj]) -> None:
    (rule,) = manifests.by_kind(docs, "PrometheusRule").values()
    files = sync.prometheus_rule_files()
    if not files:
        assert rule["spec"]["groups"] == [{"name": sync.PLACEHOLDER_GROUP, "rules": []}]
        pytest.skip("deploy/prometheus/alerts.yml does not exist yet: the PrometheusRule is a placeholder")
    groups = [g for f in files for g in yaml.safe_load(f.read_text(encoding="utf-8"))["groups"]]
    assert rule["spec"]["groups"] == groups


def test_dashboards_are_config_maps_for_the_sidecar(docs: list[Obj]) -> None:
    files = sync.dashboard_files()
    maps = {n: cm for n, cm in manifests.by_kind(docs, "ConfigMap").items()
            if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    assert set(maps) == {sync.dashboard_name(f) for f in files}
    if not files:
        pytest.skip("deploy/grafana/*.json does not exist yet: no dashboard ConfigMaps")
    for f in files:
        assert maps[sync.dashboard_name(f)]["data"] == {f.name: f.read_text(encoding="utf-8")}


def test_dev_api_keys_are_deploy_dev_and_prod_has_none(render) -> None:  # type: ignore[no-untyped-def]
    source = sync.API_KEYS_SOURCE.read_bytes()
    (secret,) = [s for s in manifests.by_kind(render("dev"), "Secret").values()
                 if s["metadata"]["name"].startswith("gateway-api-keys")]
    assert base64.b64decode(secret["data"]["api-keys.yaml"]) == source
    prod = yaml.safe_dump_all(render("prod"))
    hashes = [k["sha256"] for k in yaml.safe_load(source)["keys"]]
    assert not [h for h in hashes if h in prod], "development key hashes in the prod render"
    assert not [s for s in manifests.by_kind(render("prod"), "Secret")], "prod renders no Secrets"


def test_scrape_jobs_match_the_local_prometheus(docs: list[Obj]) -> None:
    """ServiceMonitors give targets the job names deploy/prometheus/prometheus.yml uses locally,
    so the same alert rules and dashboards work in both places."""
    local = manifests.ROOT / "deploy" / "prometheus" / "prometheus.yml"
    if not local.is_file():
        pytest.skip("deploy/prometheus/prometheus.yml does not exist yet")
    configs = {j["job_name"]: j for j in yaml.safe_load(local.read_text(encoding="utf-8"))["scrape_configs"]}
    covered = set()
    for sm in manifests.by_kind(docs, "ServiceMonitor").values():
        for endpoint in sm["spec"]["endpoints"]:
            job = [r["replacement"] for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
            where = f"ServiceMonitor/{sm['metadata']['name']} {endpoint['port']}"
            assert job and job[0] in configs, f"{where}: {job}"
            # e.g. the Pushgateway: the labels a job pushed win over the target's.
            assert endpoint.get("honorLabels", False) == configs[job[0]].get("honor_labels", False), where
            covered.add(job[0])
    # Every local scrape job has its counterpart here (prometheus itself excepted).
    assert set(configs) - {"prometheus"} <= covered, sorted(set(configs) - covered)
