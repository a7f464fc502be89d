"""The two overlays are what they say: dev small and on CPU, prod replicated, GPU, autoscaled."""

from __future__ import annotations

from typing import Any

import yaml

from devtools.k8s import manifests
from devtools.k8s.manifests import Obj
from services.common import topics

GPU = "nvidia.com/gpu"
STAGES = ("gateway", "tokenizer", "moderation", "prompt", "feedback", "conversation")
# StatefulSets that are not Colloquy services: the conversation store's database.
DATABASES = ("postgres",)
HPA_TARGETS = ("gateway", "tokenizer", "moderation", "prompt")


def _gpu_requests(objects: list[Obj]) -> list[str]:
    return [f"{pt.owner}/{c['name']}" for pt in manifests.all_pod_templates(objects) for c in pt.containers()
            if GPU in c.get("resources", {}).get("limits", {})]


def _rayservice(docs: list[Obj]) -> dict[str, Any]:
    (rs,) = manifests.by_kind(docs, "RayService").values()
    return rs["spec"]


def test_both_overlays_render_every_component(docs: list[Obj]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "RayService", "CronJob", "StatefulSet",
            "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    assert set(manifests.by_kind(docs, "StatefulSet")) == set(STAGES) | set(DATABASES)


def test_dev_is_one_replica_on_cpu(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("dev")
    objects = docs + manifests.embedded_objects(docs)
    assert {s["spec"]["replicas"] for s in manifests.by_kind(docs, "StatefulSet").values()} == {1}
    assert manifests.by_kind(docs, "Deployment")["web"]["spec"]["replicas"] == 1
    assert not _gpu_requests(objects)
    assert manifests.by_kind(docs, "ConfigMap")["generation-engine"]["data"]["GENERATION_PROVIDER"] == "cpu"
    cluster = _rayservice(docs)["rayClusterConfig"]
    assert [(g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]] == [(1, 1)]
    assert not manifests.by_kind(docs, "HorizontalPodAutoscaler")
    assert not manifests.by_kind(docs, "PodDisruptionBudget")
    images = {c["image"] for pt in manifests.all_pod_templates(docs) for c in pt.containers()}
    assert not [i for i in images if "cuda" in i]


def test_prod_generation_runs_on_gpus_and_autoscales(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("prod")
    spec = _rayservice(docs)
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"][GPU] == "1" and "cuda" in worker["image"]
    assert group["maxReplicas"] > group["minReplicas"] >= 2
    serve = yaml.safe_load(spec["serveConfigV2"])
    auto = serve["applications"][0]["deployments"][0]["autoscaling_config"]
    assert auto["max_replicas"] > auto["min_replicas"] >= 2
    assert manifests.by_kind(docs, "ConfigMap")["generation-engine"]["data"]["GENERATION_PROVIDER"] == "cuda"
    # The RLHF job trains on GPUs too, and runs on schedule.
    (rayjob,) = manifests.embedded_objects(docs)
    assert all(GPU in c["resources"]["limits"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    assert manifests.by_kind(docs, "CronJob")["rlhf-trigger"]["spec"]["suspend"] is False


def test_prod_autoscalers_own_the_replica_counts(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("prod")
    hpas = manifests.by_kind(docs, "HorizontalPodAutoscaler")
    sts = manifests.by_kind(docs, "StatefulSet")
    partitions = {t.name: t.partitions for t in topics.ALL}
    for name in HPA_TARGETS:
        ref = hpas[name]["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("StatefulSet", name)
        assert "replicas" not in sts[name]["spec"], f"{name}: the HPA owns spec.replicas"
        assert hpas[name]["spec"]["minReplicas"] >= 2
    # A consumer-group stage gains nothing beyond its input topic's partition count.
    for name, topic in (("tokenizer", topics.CHAT_REQUESTS), ("prompt", topics.CHAT_MODERATED),
                        ("moderation", topics.CHAT_REQUESTS)):
        assert hpas[name]["spec"]["maxReplicas"] <= partitions[topic.name], name
    assert sts["feedback"]["spec"]["replicas"] >= 2
    # web, the HTTP front, scales like the gateway it translates for.
    ref = hpas["web"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "web")
    assert "replicas" not in manifests.by_kind(docs, "Deployment")["web"]["spec"], "web: the HPA owns spec.replicas"
    assert hpas["web"]["spec"]["minReplicas"] >= 2
    # Materializers split conversation.turns' partitions; more than it has would idle.
    assert 2 <= sts["conversation"]["spec"]["replicas"] <= partitions[topics.CONVERSATION_TURNS.name]


def test_prod_disruption_budgets_cover_every_replicated_workload(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("prod")
    pdbs = list(manifests.by_kind(docs, "PodDisruptionBudget").values())
    targets = [pt for pt in manifests.all_pod_templates(docs)
               if pt.owner.startswith("StatefulSet/") or pt.owner.startswith("RayService/generation:gpu")
               or pt.owner == "Deployment/web"]
    assert "Deployment/web" in {pt.owner for pt in targets}
    for pt in targets:
        matching = [p for p in pdbs if manifests.selects(p["spec"]["selector"], pt.labels)]
        assert len(matching) == 1, pt.owner
        assert matching[0]["spec"].get("maxUnavailable") == 1


def test_prod_uses_no_development_secrets_or_sizes(render) -> None:  # type: ignore[no-untyped-def]
    docs = render("prod")
    assert "dual-role" not in manifests.by_kind(docs, "KafkaNodePool")
    assert not manifests.by_kind(docs, "Secret")
