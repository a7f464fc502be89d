"""The Grafana dashboards in deploy/grafana/ as data: every panel query, made runnable on plain Prometheus.

Grafana is not installable here, so tests run what Grafana would run: each target's `expr` with
Grafana's built-in variables replaced the way Grafana replaces them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"

# Metrics the RLHF job pushes to the Pushgateway (job="colloquy-rlhf"); absent until a run.
RLHF_JOB = "colloquy-rlhf"
RLHF_PREFIX = "colloquy_rlhf_"
# Every Colloquy metric is prefixed; anything else a query names must be listed here.
OTHER_METRICS = frozenset({"up", "push_time_seconds"})
METRIC = re.compile(r"(?<![\w:\"'])(colloquy_[A-Za-z0-9_:]+)")


@dataclasses.dataclass(frozen=True)
class Query:
    """One panel target: what Grafana sends to Prometheus for it."""

    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool = False

    @property
    def id(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref}"

    @property
    def rlhf(self) -> bool:
        """Fed by the RLHF job's pushes, so empty until a training run has pushed."""
        return RLHF_PREFIX in self.expr or f'job="{RLHF_JOB}"' in self.expr


def dashboard_files() -> list[Path]:
    return sorted(GRAFANA.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows (collapsed rows keep theirs in `panels`)."""
    for panel in doc.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(path: Path) -> list[Query]:
    doc = load(path)
    out = []
    for panel in panels(doc):
        for target in panel.get("targets", []):
            out.append(Query(path.stem, panel.get("title", ""), target.get("refId", ""), target.get("expr", ""),
                             bool(target.get("instant")) and not target.get("range")))
    return out


def all_queries() -> list[Query]:
    return [q for path in dashboard_files() for q in queries(path)]


def rate_interval(step_s: float, scrape_s: float) -> float:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval)."""
    return max(step_s + scrape_s, 4 * scrape_s)


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def substitute(expr: str, *, step_s: float, scrape_s: float, range_s: float) -> str:
    """`expr` with Grafana's built-in variables replaced; a variable left over is an error."""
    values = {
        "__rate_interval": _duration(rate_interval(step_s, scrape_s)),
        "__interval": _duration(step_s),
        "__interval_ms": str(round(step_s * 1000)),
        "__range": _duration(range_s),
        "__range_s": str(round(range_s)),
        "__range_ms": str(round(range_s * 1000)),
    }

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    # Longest names first so $__interval_ms is not read as $__interval + "_ms".
    return re.sub(r"\$\{(\w+)\}|\$(__range_ms|__range_s|__range|__interval_ms|__interval|__rate_interval|\w+)",
                  repl, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (Colloquy's own, plus the few others it may use)."""
    names = set(METRIC.findall(expr))
    names |= {n for n in OTHER_METRICS if re.search(rf"(?<![\w\"']){n}\s*[{{\[(]", expr)}
    return names


def alert_rules() -> list[dict[str, Any]]:
    import yaml

    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
