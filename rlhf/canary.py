"""Gated promotion: serve a candidate to a canary share, compare it with the stable version in
Prometheus, then promote it or roll it back, and record why in the registry.

Three parts:

* :func:`decide` (no I/O): canary against stable on error rate, time to first token (p50, p95),
  output-moderation block rate and thumbs-up ratio, each with a tolerance and a minimum sample
  count; a rate fails only when it is past its limit by more than chance explains (one-sided
  two-proportion z-test at ``confidence``). Any failing check rolls back; all passing promotes;
  otherwise the outcome is ``inconclusive`` (too few samples, or past a limit within chance).
* :class:`Prometheus`: instant PromQL queries over the canary's window through the HTTP API
  (``/api/v1/query``) with ``requests``, which the job's environment already has. Only one
  endpoint is used; ``prometheus-api-client`` would add pandas, matplotlib and dateparser to the
  training image for it.
* :func:`run_canary`: the controller. It starts the canary with the announced rollout
  (``services.generation.updates``: registry canary file + ``model.updates``), looks every
  ``interval_s`` after a ``warmup_s`` it does not judge (a failing check rolls back at once),
  decides after ``watch_s`` (extended ``extensions`` times while inconclusive; still inconclusive
  rolls back: not proven), then promotes fully or rolls back the same way, and records the decision, its
  reasons and the figures with :meth:`model.registry.Registry.record_canary`.

The series it reads carry ``model_version`` (the version that served the request or wrote the
answer): ``colloquy_generation_requests_total``, ``colloquy_generation_time_to_first_token_seconds``,
``colloquy_moderation_output_verdicts_total`` and ``colloquy_feedback_ratings_total``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from rlhf.config import CanaryConfig

log = logging.getLogger(__name__)

PROMOTE, ROLLBACK, INCONCLUSIVE = "promote", "rollback", "inconclusive"


class CanaryError(RuntimeError):
    """The canary could not be run (not eligible, Prometheus unreachable, a rollout refused)."""


# ------------------------------------------------------------------------------------ decision
@dataclasses.dataclass(frozen=True)
class VersionStats:
    """What Prometheus says about one version over the canary's window."""

    version: str
    requests: float = 0.0  # finished requests (ok + error; cancelled and overloaded left out)
    errors: float = 0.0
    ttft_count: float = 0.0
    ttft_p50: float | None = None  # seconds
    ttft_p95: float | None = None
    verdicts: float = 0.0  # output moderation verdicts (one per candidate answer)
    blocked: float = 0.0
    thumbs_up: float = 0.0
    thumbs_down: float = 0.0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def block_rate(self) -> float | None:
        return self.blocked / self.verdicts if self.verdicts else None

    @property
    def ratings(self) -> float:
        return self.thumbs_up + self.thumbs_down

    @property
    def thumbs_up_ratio(self) -> float | None:
        return self.thumbs_up / self.ratings if self.ratings else None


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison. ``passed`` None: too few samples, or (a rate) beyond its limit by less than
    chance explains, so the watch waits for more."""

    name: str
    canary: float | None
    stable: float | None
    limit: float | None  # the worst value the canary may have
    samples: tuple[float, float]  # canary's, stable's
    passed: bool | None
    z: float | None = None  # rates: how many standard errors the canary is past its limit

    def reason(self) -> str:
        c, s, lim = (_fmt(v) for v in (self.canary, self.stable, self.limit))
        n = f"n={self.samples[0]:.0f}/{self.samples[1]:.0f}"
        if self.limit is None:
            return f"{self.name}: too few samples ({n}, canary/stable)"
        z = "" if self.z is None or self.z <= 0 else f", z={self.z:.2f}"  # only past the limit
        if self.passed is None:
            return f"{self.name}: canary {c} vs stable {s}, past the limit {lim} but within chance ({n}{z})"
        verb = "within" if self.passed else "outside"
        return f"{self.name}: canary {c} vs stable {s}, {verb} the limit {lim} ({n}{z})"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@dataclasses.dataclass(frozen=True)
class Decision:
    outcome: str  # promote, rollback or inconclusive
    reasons: list[str]
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reasons": self.reasons,
                "checks": [dataclasses.asdict(c) for c in self.checks]}


def _quantile_check(name: str, canary: float | None, stable: float | None, cfg: CanaryConfig,
                    samples: tuple[float, float]) -> Check:
    """A TTFT quantile: at most ``ttft_ratio`` times the stable version's plus ``ttft_slack_s``."""
    if stable is None or canary is None or min(samples) < cfg.min_requests:
        return Check(name, canary, stable, None, samples, None)
    limit = stable * cfg.ttft_ratio + cfg.ttft_slack_s
    return Check(name, canary, stable, limit, samples, canary <= limit + 1e-12)


def _rate_check(name: str, canary: float | None, stable: float | None, tolerance: float,
                samples: tuple[float, float], minimum: float, z_crit: float, higher_is_better: bool = False) -> Check:
    """A proportion (error, block, thumbs-up rate): it fails when the canary is past the stable
    version's rate by more than ``tolerance`` AND a one-sided two-proportion z-test puts the excess
    over ``tolerance`` beyond ``z_crit`` standard errors; past the limit by less is not yet a verdict."""
    if stable is None or canary is None or min(samples) < minimum:
        return Check(name, canary, stable, None, samples, None)
    sign = -1.0 if higher_is_better else 1.0
    limit = stable + sign * tolerance
    n_c, n_s = samples
    pooled = (canary * n_c + stable * n_s) / (n_c + n_s)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-6) * (1 / n_c + 1 / n_s))
    z = sign * (canary - limit) / se
    if z <= 1e-12:
        return Check(name, canary, stable, limit, samples, True, round(z, 3))
    return Check(name, canary, stable, limit, samples, False if z > z_crit else None, round(z, 3))


def decide(canary: VersionStats, stable: VersionStats, cfg: CanaryConfig) -> Decision:
    """Compare ``canary`` with ``stable`` under ``cfg``'s tolerances, minimum samples and confidence."""
    z_crit = statistics.NormalDist().inv_cdf(cfg.confidence)
    ttfts = (canary.ttft_count, stable.ttft_count)
    checks = [
        _rate_check("error rate", canary.error_rate, stable.error_rate, cfg.max_error_rate_increase,
                    (canary.requests, stable.requests), cfg.min_requests, z_crit),
        _quantile_check("TTFT p50 (s)", canary.ttft_p50, stable.ttft_p50, cfg, ttfts),
        _quantile_check("TTFT p95 (s)", canary.ttft_p95, stable.ttft_p95, cfg, ttfts),
        _rate_check("output block rate", canary.block_rate, stable.block_rate, cfg.max_block_rate_increase,
                    (canary.verdicts, stable.verdicts), cfg.min_requests, z_crit),
    ]
    if cfg.min_ratings:
        checks.append(_rate_check("thumbs-up ratio", canary.thumbs_up_ratio, stable.thumbs_up_ratio,
                                  cfg.max_thumbs_up_drop, (canary.ratings, stable.ratings), cfg.min_ratings,
                                  z_crit, higher_is_better=True))
    failed = [c for c in checks if c.passed is False]
    if failed:
        return Decision(ROLLBACK, [c.reason() for c in failed], checks)
    if all(c.passed for c in checks):
        return Decision(PROMOTE, [c.reason() for c in checks], checks)
    return Decision(INCONCLUSIVE, [c.reason() for c in checks if c.passed is None], checks)


def eligible(manifest: Mapping[str, Any], report: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    """Whether a published child may go to a canary: its manifest records a passed quality gate
    AND a passed replay evaluation (``rlhf.replay``'s result, ``passed``, in the manifest's
    ``replay`` or ``training.replay``, or in the job's report)."""
    gate = (manifest.get("quality") or {}).get("gate")
    if not isinstance(gate, Mapping) or gate.get("passed") is not True:
        state = "failed" if isinstance(gate, Mapping) else "no record of"
        return False, f"{state} the quality gate"
    replay = manifest.get("replay") or (manifest.get("training") or {}).get("replay") \
        or (report or {}).get("replay")
    if not isinstance(replay, Mapping) or "passed" not in replay:
        return False, "no replay evaluation recorded"
    if replay.get("passed") is not True:
        return False, "failed the replay evaluation"
    return True, "passed the quality gate and the replay evaluation"


# ------------------------------------------------------------------------------------ Prometheus
class Prometheus:
    """Instant queries against Prometheus's HTTP API."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """The vector result of ``promql`` (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        import requests

        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            resp = requests.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise CanaryError(f"Prometheus at {self.url} is unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise CanaryError(f"Prometheus at {self.url} answered HTTP {resp.status_code}, not JSON") from exc
        if body.get("status") != "success":
            raise CanaryError(f"Prometheus refused {promql!r}: {body.get('errorType')}: {body.get('error')}")
        if body["data"]["resultType"] != "vector":
            raise CanaryError(f"{promql!r} is not an instant vector query")
        return body["data"]["result"]

    def by_label(self, promql: str, label: str, at: float | None = None) -> dict[str, float]:
        """``{label value: sample}``; NaN (a quantile of no observations) is left out."""
        out: dict[str, float] = {}
        for item in self.query(promql, at):
            value = float(item["value"][1])
            if not math.isnan(value):
                out[item["metric"].get(label, "")] = value
        return out


def queries(window_s: int, versions: tuple[str, ...], thumbs_source: str = "all") -> dict[str, str]:
    """The PromQL of every figure, per ``model_version``, over the last ``window_s`` seconds."""
    sel = "|".join(v.replace(".", "\\\\.") for v in versions)
    v = f'model_version=~"{sel}"'
    w = f"[{window_s}s]"
    src = "" if thumbs_source == "all" else f',source="{thumbs_source}"'

    def ttft(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (le, model_version) "
                f"(increase(colloquy_generation_time_to_first_token_seconds_bucket{{{v}}}{w})))")

    def total(metric: str, extra: str = "") -> str:
        return f"sum by (model_version) (increase({metric}{{{v}{extra}}}{w}))"

    return {
        "requests": total("colloquy_generation_requests_total", ',outcome=~"ok|error"'),
        "errors": total("colloquy_generation_requests_total", ',outcome="error"'),
        "ttft_count": total("colloquy_generation_time_to_first_token_seconds_count"),
        "ttft_p50": ttft("0.5"),
        "ttft_p95": ttft("0.95"),
        "verdicts": total("colloquy_moderation_output_verdicts_total"),
        "blocked": total("colloquy_moderation_output_verdicts_total", ',action="block"'),
        "thumbs_up": total("colloquy_feedback_ratings_total", f',verdict="up"{src}'),
        "thumbs_down": total("colloquy_feedback_ratings_total", f',verdict="down"{src}'),
    }


def fetch_stats(prom: Prometheus, window_s: float, canary: str, stable: str,
                thumbs_source: str = "all", at: float | None = None) -> tuple[VersionStats, VersionStats]:
    """Both versions' figures over the window ending now (or at ``at``)."""
    window = max(1, math.ceil(window_s))
    figures = {name: prom.by_label(q, "model_version", at)
               for name, q in queries(window, (canary, stable), thumbs_source).items()}

    def stats(version: str) -> VersionStats:
        got = {name: values.get(version) for name, values in figures.items()}
        counts = {k: got[k] or 0.0 for k in ("requests", "errors", "ttft_count", "verdicts", "blocked",
                                             "thumbs_up", "thumbs_down")}
        return VersionStats(version, ttft_p50=got["ttft_p50"], ttft_p95=got["ttft_p95"], **counts)

    return stats(canary), stats(stable)


# ------------------------------------------------------------------------------------ controller
class Rollout(Protocol):
    """How the controller moves traffic (the announced rollout, or a fake in a unit test)."""

    def start(self, version: str, percent: int) -> None: ...
    def promote(self, version: str) -> None: ...
    def rollback(self) -> None: ...


class AnnouncedRollout:
    """``services.generation.updates``: the registry records the move and ``model.updates``
    tells the running replicas (exactly as ``make promote`` / ``make rollback``)."""

    def __init__(self, registry_root: str, deployment: str) -> None:
        self.args = ["--deployment", deployment, "--registry", registry_root]

    def _run(self, *command: str) -> None:
        from services.generation import updates

        code = updates.main([*self.args, *command])
        if code:
            raise CanaryError(f"rollout {' '.join(command)} refused (exit {code})")

    def start(self, version: str, percent: int) -> None:
        self._run("promote", version, "--canary", str(percent))

    def promote(self, version: str) -> None:
        self._run("promote", version)

    def rollback(self) -> None:
        self._run("rollback")


StatsSource = Callable[[float, str, str], tuple[VersionStats, VersionStats]]


def watch(source: StatsSource, canary: str, stable: str, cfg: CanaryConfig,
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> tuple[Decision, list[dict[str, Any]]]:
    """After ``warmup_s`` (the canary's model loading and cold caches, not judged), look every
    ``interval_s`` until ``watch_s`` is over (plus extensions while inconclusive), each look over
    the window since the warm-up ended; a rollback decided on enough samples ends the watch at once.
    Returns the decision (an inconclusive one after every extension becomes a rollback) and every
    look taken (``elapsed_s``: since the warm-up)."""
    if cfg.warmup_s:
        log.info("canary %s: warming up for %.0f s (not judged)", canary, cfg.warmup_s)
        sleep(cfg.warmup_s)
    started = clock()
    deadline = started + cfg.watch_s
    extensions = cfg.extensions
    looks: list[dict[str, Any]] = []
    while True:
        sleep(max(0.0, min(cfg.interval_s, deadline - clock())))
        elapsed = clock() - started
        c, s = source(elapsed, canary, stable)
        decision = decide(c, s, cfg)
        looks.append({"elapsed_s": round(elapsed, 1), "outcome": decision.outcome,
                      "canary": dataclasses.asdict(c), "stable": dataclasses.asdict(s)})
        log.info("canary %s after %.0f s: %s; %s", canary, elapsed, decision.outcome, "; ".join(decision.reasons))
        if decision.outcome == ROLLBACK:
            return decision, looks
        if clock() < deadline:
            continue
        if decision.outcome == PROMOTE:
            return decision, looks
        if extensions:
            extensions -= 1
            deadline = clock() + cfg.watch_s
            log.info("canary %s: too few samples, watching %.0f s more", canary, cfg.watch_s)
            continue
        return Decision(ROLLBACK, [f"not proven after {elapsed:.0f} s: {r}" for r in decision.reasons],
                        decision.checks), looks


def run_canary(registry: Any, deployment: str, version: str, percent: int, cfg: CanaryConfig,
               source: StatsSource | None = None, rollout: Rollout | None = None,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Canary ``version`` at ``percent``% of conversations, watch, promote or roll back, and
    record the outcome in the registry; returns the record. A rollout or Prometheus failure after
    the canary started rolls it back (recorded as an error) and raises :class:`CanaryError`."""
    if not 1 <= percent <= 99:
        raise CanaryError(f"canary percent {percent} is outside 1..99")
    stable = registry.current(deployment)
    if not stable:
        raise CanaryError(f"deployment {deployment!r} has no current version to compare with")
    if stable == version:
        raise CanaryError(f"{version!r} is already the stable version of {deployment!r}")
    rollout = rollout or AnnouncedRollout(str(registry.root), deployment)
    if source is None:
        prom = Prometheus(cfg.prometheus_url)
        prom.query("vector(1)")  # unreachable Prometheus: refuse before any traffic moves

        def source(elapsed: float, c: str, s: str) -> tuple[VersionStats, VersionStats]:
            return fetch_stats(prom, elapsed, c, s, cfg.thumbs_source)

    settings = {"percent": percent, "warmup_s": cfg.warmup_s, "watch_s": cfg.watch_s, "interval_s": cfg.interval_s,
                "extensions": cfg.extensions, "min_requests": cfg.min_requests, "min_ratings": cfg.min_ratings,
                "max_error_rate_increase": cfg.max_error_rate_increase, "ttft_ratio": cfg.ttft_ratio,
                "ttft_slack_s": cfg.ttft_slack_s, "max_block_rate_increase": cfg.max_block_rate_increase,
                "max_thumbs_up_drop": cfg.max_thumbs_up_drop, "thumbs_source": cfg.thumbs_source,
                "confidence": cfg.confidence}
    log.info("canary %s at %d%% beside %s for %.0f s", version, percent, stable, cfg.watch_s)
    rollout.start(version, percent)
    started = clock()
    try:
        decision, looks = watch(source, version, stable, cfg, sleep, clock)
    except Exception as exc:
        rollout.rollback()
        registry.record_canary(deployment, version, {
            "outcome": ROLLBACK, "stable_version": stable, "reasons": [f"watch failed: {exc}"],
            "settings": settings, "watched_s": round(clock() - started, 1)})
        raise CanaryError(f"canary {version} rolled back: watching it failed: {exc}") from exc
    if decision.outcome == PROMOTE:
        rollout.promote(version)
    else:
        rollout.rollback()
    last = looks[-1]
    record = {"outcome": decision.outcome, "stable_version": stable, "reasons": decision.reasons,
              "checks": decision.as_dict()["checks"], "settings": settings,
              "watched_s": round(clock() - started, 1), "looks": len(looks),
              "canary_stats": last["canary"], "stable_stats": last["stable"]}
    entry = registry.record_canary(deployment, version, record)
    log.info("canary %s: %s (%s)", version, decision.outcome, "; ".join(decision.reasons))
    return entry


def gated_canary(registry: Any, deployment: str, version: str, percent: int, cfg: CanaryConfig,
                 report: Mapping[str, Any] | None = None, **controller: Any) -> dict[str, Any]:
    """The job's ``--canary`` step: run :func:`run_canary` only for a child that passed the quality
    gate and the replay evaluation (:func:`eligible`); otherwise nothing moves and the returned
    ``{"outcome": "not started", "reasons": [...]}`` says why (also logged, not recorded: no
    canary ran)."""
    ok, why = eligible(registry.manifest(version), report)
    if not ok:
        log.info("canary of %s not started: %s", version, why)
        return {"outcome": "not started", "version": version, "reasons": [why]}
    return run_canary(registry, deployment, version, percent, cfg, **controller)
