"""Each overlay asks Serve for no more generation replicas than its Ray worker groups hold.

The rule of `python -m services.generation` locally (serving.cap_replicas), applied to the
requested resources: a replica needs ray_actor_options' CPUs (and GPUs) on one worker pod, so a
group of pods holds maxReplicas x what one pod's rayStartParams fit.
"""

from __future__ import annotations

import copy

import yaml

from devtools.k8s import manifests
from services.generation import serving


def test_serve_replicas_fit_the_worker_groups(docs: list[manifests.Obj], overlay: str) -> None:
    (rs,) = manifests.by_kind(docs, "RayService").values()
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (dep,) = serve["applications"][0]["deployments"]
    auto = dep["autoscaling_config"]
    most = least = 0
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        per_pod = serving.cap_replicas(copy.deepcopy(dep), float(params.get("num-cpus", 0)),
                                       float(params.get("num-gpus", 0))).fits
        most += group["maxReplicas"] * per_pod
        least += group["minReplicas"] * per_pod
    assert 1 <= auto["max_replicas"] <= most, f"{overlay}: {auto['max_replicas']} replicas, room for {most}"
    assert auto["min_replicas"] <= least, f"{overlay}: {auto['min_replicas']} replicas always, room for {least}"


def test_autoscaling_target_is_a_full_batch(docs: list[manifests.Obj], overlay: str) -> None:
    """Serve adds a replica once replicas average a full batch, and admits running + waiting."""
    (rs,) = manifests.by_kind(docs, "RayService").values()
    (dep,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    engine = manifests.by_kind(docs, "ConfigMap")["generation-engine"]["data"]
    running, waiting = int(engine["GENERATION_MAX_RUNNING"]), int(engine["GENERATION_MAX_WAITING"])
    assert dep["autoscaling_config"]["target_ongoing_requests"] == running
    assert dep["max_ongoing_requests"] == running + waiting
