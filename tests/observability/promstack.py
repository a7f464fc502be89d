"""A real Prometheus and Pushgateway (Debian's binaries) on free ports, for tests.

Prometheus gets deploy/prometheus/prometheus.yml's scrape jobs and labels with only the addresses
changed to the test stack's, so the shipped config is what the dashboards are tested through.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devtools.procs import free_port
from devtools.services import SERVICES
from tests.observability.grafana import PROMETHEUS, ROOT


class PromError(RuntimeError):
    """Prometheus refused a query (bad_data: it does not parse, or it cannot be evaluated)."""


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:  # scripts/bootstrap-system.sh installs Debian's prometheus and prometheus-pushgateway
        raise FileNotFoundError(f"{name} is not installed: run `make setup`")
    return path


def local_metrics_ports() -> dict[str, int]:
    """service -> metrics port of the local stack (devtools/services.py, the table scripts/stack.sh runs)."""
    return {s.name: s.local_metrics_port({}) for s in SERVICES}


def local_config() -> dict[str, Any]:
    return yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))


def rewrite_targets(config: dict[str, Any], addresses: dict[int, str | None]) -> list[dict[str, Any]]:
    """The config's scrape jobs with each local target port replaced by `addresses[port]`.

    None drops a target; a port not in `addresses` is an error (the test could not scrape it).
    Jobs without static targets (file_sd: Ray's random port) are left out.
    """
    jobs = []
    for job in config["scrape_configs"]:
        statics = job.get("static_configs")
        if not statics:
            continue
        new_statics = []
        for sc in statics:
            targets = []
            for target in sc["targets"]:
                port = int(target.rsplit(":", 1)[1])
                if port not in addresses:
                    raise KeyError(f"job {job['job_name']}: no test address for {target}")
                if addresses[port] is not None:
                    targets.append(addresses[port])
            if targets:
                new_statics.append({**sc, "targets": targets})
        if new_statics:
            jobs.append({**job, "static_configs": new_statics})
    return jobs


class Process:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._out.close()


def _wait_ready(url: str, proc: Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{proc.log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class Pushgateway:
    def __init__(self, workdir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = Process([binary("prometheus-pushgateway"), f"--web.listen-address={self.address}"],
                            workdir / "pushgateway.log")
        _wait_ready(f"http://{self.address}/-/ready", self.proc)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        self.proc.stop()


class Prometheus:
    """Prometheus scraping `scrape_configs` every `scrape_s`, evaluating the repo's alert rules."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], scrape_s: float = 1.0) -> None:
        self.scrape_s = scrape_s
        self.address = f"127.0.0.1:{free_port()}"
        interval = f"{round(scrape_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(PROMETHEUS / "alerts.yml")],
            "scrape_configs": scrape_configs,
        }
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.proc = Process([
            binary("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={self.address}", "--storage.tsdb.retention.time=1h",
        ], workdir / "prometheus.log")
        _wait_ready(f"http://{self.address}/-/ready", self.proc)
        self.started = time.time()

    def api(self, path: str, **params: Any) -> Any:
        """GET/POST the HTTP API; returns `data`, raises PromError with Prometheus' message."""
        body = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(f"http://{self.address}/api/v1/{path}", data=body, timeout=30) as resp:
                doc = json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                doc = json.load(exc)
            except ValueError:
                raise PromError(f"{path}: HTTP {exc.code}") from None
        if doc.get("status") != "success":
            raise PromError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def stop(self) -> None:
        self.proc.stop()
