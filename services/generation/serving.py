"""Start a local Ray and deploy serve_config.yaml, the way `serve run config.yaml` does.

`python -m services.generation` and the tests share this so both run exactly the config file that
KubeRay gets; only ports, replica counts and the model can be overridden (tests, dev machines).
"""

from __future__ import annotations

import copy
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
                app_args: dict[str, Any] | None = None) -> Any:
    """The validated ServeDeploySchema of `path` with the given overrides applied."""
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
    return ServeDeploySchema.model_validate(doc)


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
            ray.shutdown()
            time.sleep(2)


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
