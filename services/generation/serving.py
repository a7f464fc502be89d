"""Start a local Ray and deploy serve_config.yaml, the way `serve run config.yaml` does.

`python -m services.generation` and the tests share this so both run exactly the config file that
KubeRay gets; only ports, replica counts and the model can be overridden (tests, dev machines).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from services.common import private_api

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def load_config(path: str | Path, *, grpc_port: int = 0, http_port: int | None = None,
                deployment_overrides: dict[str, Any] | None = None,
                app_args: dict[str, Any] | None = None,
                capacity: dict[str, float] | None = None) -> Any:
    """The validated ServeDeploySchema of `path` with the given overrides applied.

    With `capacity` (Ray resources, {"CPU": n, "GPU": m}), each deployment's replica bounds are
    lowered to what those resources hold (`cap_replicas`), and the decision is logged.
    """
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    doc = copy.deepcopy(doc)
    if grpc_port:
        doc.setdefault("grpc_options", {})["port"] = grpc_port
    if http_port is not None:
        doc.setdefault("http_options", {})["port"] = http_port
    for app in doc.get("applications", []):
        if app_args:
            app["args"] = {**(app.get("args") or {}), **app_args}
        for dep in app.get("deployments", []):
            for key, value in (deployment_overrides or {}).items():
                if value is None:
                    dep.pop(key, None)
                else:
                    dep[key] = value
            if capacity is not None:
                decision = cap_replicas(dep, capacity.get("CPU", 0.0), capacity.get("GPU", 0.0))
                log.log(logging.WARNING if decision.lowered else logging.INFO, "generation replica bounds",
                        extra={"deployment": dep.get("name"), **dataclasses.asdict(decision)})
    return ServeDeploySchema.model_validate(doc)


@dataclasses.dataclass(frozen=True)
class ReplicaCap:
    """What `cap_replicas` decided for one deployment, and from what."""

    configured: int  # max_replicas (or num_replicas) in the config
    fits: int  # replicas the resources hold at the deployment's ray_actor_options
    max_replicas: int  # after the cap (at least 1)
    cpus: float
    gpus: float
    cpus_per_replica: float
    gpus_per_replica: float
    lowered: bool
    reason: str


def cap_replicas(dep: dict[str, Any], cpus: float, gpus: float) -> ReplicaCap:
    """Lower `dep`'s replica bounds (in place) to what `cpus`/`gpus` hold at its ray_actor_options.

    A replica reserves ray_actor_options' num_cpus (Serve's default: 1) and num_gpus (0). A
    CPU replica's ONNX Runtime runs one intra-op thread per core, so a second replica on cores
    the first already uses only splits them (issue 22: the gateway's overhead over the
    deployment rose from 186 to 463 ms p50 when a second replica appeared on 2 cores): the
    config declares the cores a replica computes on, and replicas beyond cpus // that (or gpus
    // num_gpus) are not asked for, rather than left pending by Ray or squeezed onto busy cores.
    """
    opts = dep.get("ray_actor_options") or {}
    per_cpu = float(opts.get("num_cpus", 1) or 0)
    per_gpu = float(opts.get("num_gpus", 0) or 0)
    limits = []
    if per_cpu > 0:
        limits.append(int(cpus // per_cpu))
    if per_gpu > 0:
        limits.append(int(gpus // per_gpu))
    auto = dep.get("autoscaling_config")
    fixed = dep.get("num_replicas")
    if not auto and fixed == "auto":  # Serve's own autoscaling defaults: bound them explicitly
        auto = dep["autoscaling_config"] = {}
        dep.pop("num_replicas")
    configured = int(auto.get("max_replicas", 1) if auto is not None else fixed or 1)
    fits = min(limits) if limits else configured
    cap = max(1, min(configured, fits))
    if fits < 1:
        reason = "the resources hold no replica: one is asked for and Ray will keep it pending"
    elif cap < configured:
        reason = f"lowered from {configured}: the resources hold {fits}"
    else:
        reason = f"{configured} fit"
    if auto is not None:
        auto["max_replicas"] = cap
        for key in ("min_replicas", "initial_replicas"):
            if auto.get(key) is not None and auto[key] > cap:
                auto[key] = cap
    else:
        dep["num_replicas"] = cap
    return ReplicaCap(configured, fits, cap, cpus, gpus, per_cpu, per_gpu, cap < configured, reason)


def local_capacity() -> dict[str, float]:
    """The connected Ray's CPU and GPU resources; warns when it declares more CPUs than exist."""
    import ray

    res = ray.cluster_resources()
    cap = {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}
    cores = os.cpu_count() or 1
    if cap["CPU"] > cores:
        log.warning("Ray declares more CPUs than the machine has: replicas will share cores",
                    extra={"ray_cpus": cap["CPU"], "cores": cores})
    return cap


# Ray's own settings for the local Ray this process starts (k8s sets the same in the
# generation-engine ConfigMap, which the Ray nodes read; tests/k8s/test_config_keys checks).
RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def init_ray(address: str = "", num_cpus: int = 2, object_store_mb: int = 200) -> None:
    """Connect to `address`, or start a small local Ray (no dashboard) that can import our code."""
    import ray

    if ray.is_initialized():
        return
    # Local workers inherit this process's environment: make the repo and generated code importable.
    paths = [str(ROOT), str(ROOT / "build" / "python")]
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + current))
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    if address:
        ray.init(address=address, namespace="serve", log_to_driver=True)
        return
    # Ray starts its workers at niceness 15 (to keep drivers responsive). Here the workers *are*
    # the serving path: at 15 the generation replica yields the CPU to every other process on the
    # machine, which on a shared 2-core box starved it (measured by the benchmark suite).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Serve's controller reconciles every 0.1 s by default: with its GCS calls that cost 0.28 ms of
    # CPU per generated token at 16 streams on 2 cores, taken from the replica (bench/engine_cpu).
    # Every 0.5 s it costs 0.11 and the replica streams 4-7% more tokens a second; the controller
    # only reacts to deaths, scaling and redeploys 0.4 s later (health checks keep their own period).
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    # On a loaded 2-core machine the raylet sometimes gives up waiting for its metrics agent
    # ("The current node timed out during startup"); a fresh attempt then succeeds.
    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="serve",
                     object_store_memory=object_store_mb * 1024 * 1024, log_to_driver=True,
                     configure_logging=False)
            return
        except Exception:
            if attempt == 2:
                raise
            logging.getLogger(__name__).warning("local Ray failed to start; retrying", exc_info=True)
            shutdown_ray(serve_apps=False)
            time.sleep(2)


def shutdown_ray(*, serve_apps: bool = True) -> None:
    """Stop Serve's applications (`serve_apps`) and disconnect from Ray, stopping a Ray that
    `init_ray` started, without letting a garbage collection race the disconnect.

    `ray.shutdown()` destroys the driver's C++ core worker a moment before it deletes the Python
    attribute Ray's finalizers test (`ObjectRef`, `ActorHandle` and `ObjectRefGenerator` each
    check `hasattr(global_worker, "core_worker")`). A collection another thread starts in between
    would finalize an ObjectRef against the destroyed core worker, and Ray ends the whole process
    with status 1 ("The core worker has already been shutdown ... The process will exit"). CI
    lost a finished test module to that exit (2026-12-04): it was logged by a thread other than
    the one shutting down, 227 ms after the core worker was destroyed; such a collection is the
    one path we found by which an idle thread reaches the core worker. So the garbage holding Ray
    objects (Serve's routers and metrics pushers, ObjectRefs in exceptions' cycles: about 12,000
    objects after the Serve tests) is collected here first, and automatic collection stays off
    until the attribute is gone.
    """
    import gc

    import ray

    if serve_apps and ray.is_initialized():
        from ray import serve

        serve.shutdown()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        ray.shutdown()
    finally:
        if enabled:
            gc.enable()


def deploy(config: Any, timeout_s: float = 600.0) -> None:
    """Start Serve with the config's proxies and deploy its applications; wait until RUNNING.

    There is no public Python call that deploys a whole config file; this is what `serve run
    config.yaml` does (serve_start + deploy_apps).
    """
    from ray.serve.config import gRPCOptions

    client = private_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config, _blocking=False)
    wait_running([a.name for a in config.applications], timeout_s)


def redeploy(config: Any, timeout_s: float = 600.0) -> None:
    """Deploy `config`'s applications onto the running Serve (a rollout's user_config change).

    Unlike `deploy`, this does not touch Serve's proxies, so their options need not match.
    """
    private_api.serve_client().deploy_apps(config, _blocking=False)
    time.sleep(0.5)  # the controller marks the application DEPLOYING before wait_running looks
    wait_running([a.name for a in config.applications], timeout_s)


def wait_running(apps: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        status = serve.status()
        states = {name: status.applications[name].status if name in status.applications else "MISSING"
                  for name in apps}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s in {"DEPLOY_FAILED", "UNHEALTHY"}]
        if failed:
            msgs = {n: status.applications[n].message for n in failed}
            raise RuntimeError(f"Serve application failed to deploy: {msgs}")
        now = str(states)
        if now != last:
            log.info("waiting for Serve", extra={"applications": states})
            last = now
        time.sleep(0.5)
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s}s: {last}")
