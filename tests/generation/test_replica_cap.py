"""serving.cap_replicas: Serve is asked for no more generation replicas than the resources hold.

Pure dict logic (no Ray started); load_config only validates the schema.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.generation import serving
from services.generation.config import DEFAULT_SERVE_CONFIG, EngineSettings


def dep(max_replicas: int = 4, min_replicas: int = 1, **opts: float) -> dict[str, Any]:
    return {"name": "generation", "ray_actor_options": opts,
            "autoscaling_config": {"min_replicas": min_replicas, "initial_replicas": min_replicas,
                                   "max_replicas": max_replicas, "target_ongoing_requests": 16}}


@pytest.mark.parametrize(("cpus", "gpus", "opts", "expected"), [
    (2, 0, {"num_cpus": 2}, 1),  # this machine: one replica computes on both cores
    (2, 0, {"num_cpus": 1}, 2),
    (16, 0, {"num_cpus": 2}, 4),  # the config's max_replicas bounds it
    (3, 0, {"num_cpus": 2}, 1),  # a fraction of a replica is no replica
    (2, 0, {}, 2),  # Serve's default: 1 CPU per replica
    (64, 2, {"num_cpus": 2, "num_gpus": 1}, 2),  # GPUs bound a GPU replica
    (64, 8, {"num_cpus": 2, "num_gpus": 0.5}, 4),
    (4, 8, {"num_cpus": 2, "num_gpus": 1}, 2),  # ... and so do its CPUs
])
def test_cap_is_what_the_resources_hold(cpus: float, gpus: float, opts: dict[str, float], expected: int) -> None:
    d = dep(**opts)
    decision = serving.cap_replicas(d, cpus, gpus)
    assert d["autoscaling_config"]["max_replicas"] == decision.max_replicas == expected
    assert decision.lowered == (expected < 4)
    assert decision.configured == 4


def test_min_and_initial_follow_a_lowered_max() -> None:
    d = dep(max_replicas=8, min_replicas=3, num_cpus=2)
    serving.cap_replicas(d, 4, 0)
    assert d["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2,
                                       "target_ongoing_requests": 16}


def test_nothing_fits_still_asks_for_one() -> None:
    d = dep(num_cpus=2, num_gpus=1)
    decision = serving.cap_replicas(d, 16, 0)
    assert decision.fits == 0 and decision.max_replicas == 1
    assert "pending" in decision.reason


def test_fixed_replica_count_is_capped_too() -> None:
    d = {"name": "g", "num_replicas": 3, "ray_actor_options": {"num_cpus": 2}}
    assert serving.cap_replicas(d, 2, 0).max_replicas == 1 and d["num_replicas"] == 1
    d = {"name": "g", "num_replicas": "auto", "ray_actor_options": {"num_cpus": 1}}
    serving.cap_replicas(d, 2, 0)
    assert "num_replicas" not in d and d["autoscaling_config"]["max_replicas"] == 1


def test_shipped_config_on_this_machine_size(caplog: pytest.LogCaptureFixture) -> None:
    """The local config holds one replica on a 2-CPU Ray, two on 4, and the decision is logged."""
    with caplog.at_level(logging.INFO, logger=serving.__name__):
        small = serving.load_config(DEFAULT_SERVE_CONFIG, capacity={"CPU": 2.0, "GPU": 0.0})
    auto = small.applications[0].deployments[0].autoscaling_config
    assert auto["max_replicas"] == 1 and auto["min_replicas"] == 1
    (rec,) = [r for r in caplog.records if r.getMessage() == "generation replica bounds"]
    assert rec.levelno == logging.WARNING and rec.fits == 1 and rec.configured == 2  # type: ignore[attr-defined]
    big = serving.load_config(DEFAULT_SERVE_CONFIG, capacity={"CPU": 4.0, "GPU": 0.0})
    assert big.applications[0].deployments[0].autoscaling_config["max_replicas"] == 2
    untouched = serving.load_config(DEFAULT_SERVE_CONFIG)
    assert untouched.applications[0].deployments[0].autoscaling_config["max_replicas"] == 2


def test_serve_admits_what_the_engine_holds() -> None:
    """max_ongoing_requests = MAX_RUNNING + MAX_WAITING (the engine, not Serve, would otherwise
    refuse some of what Serve admits, or Serve refuse what the engine could queue); the
    autoscaling target is one full batch."""
    doc = yaml.safe_load(Path(DEFAULT_SERVE_CONFIG).read_text(encoding="utf-8"))
    (d,) = doc["applications"][0]["deployments"]
    eng = EngineSettings()
    assert d["max_ongoing_requests"] == eng.max_running + eng.max_waiting
    assert d["autoscaling_config"]["target_ongoing_requests"] == eng.max_running
